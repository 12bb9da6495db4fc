"""The best-of-n recipe: the yardstick on the reward–KL frontier, no training.

K completions per held-out evaluation prompt are sampled once from the SFT model (the same prompts, temperature
and length as every method's evaluation), scored by the gold reward and, with `algo.scorer=reward_model`, by the
learned reward model; one points row per n = 1, 2, 4, …, K follows from the order-statistics estimate in
`algos/best_of_n.py`, with `step` = n (step 0 holds n = 1: the SFT model itself) and KL = log n − (n−1)/n, an
upper bound. The samples files hold sample 0 of each prompt at step 0 and the best of all K at step K, so the
study's judges compare best-of-K against SFT like any method's final checkpoint against its start.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from rlhf_lab.algos.best_of_n import expected_best_of_n, kl_bound
from rlhf_lab.config import BestOfNConfig, RunConfig
from rlhf_lab.data.tokenize import encode_prompt
from rlhf_lab.distributed import comm
from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.eval.points import point_row
from rlhf_lab.eval.policy_eval import EvalResult, decode_samples, mean_se, sample_records, split_samples
from rlhf_lab.eval.samples import write_samples
from rlhf_lab.models.build import freeze, load_causal_lm, load_tokenizer
from rlhf_lab.models.heads import load_scalar_model
from rlhf_lab.models.sampling import sample_completions
from rlhf_lab.recipes.dpo import stage_seconds
from rlhf_lab.recipes.ppo import sampling_stages
from rlhf_lab.recipes.run import RunContext
from rlhf_lab.rewards.source import LearnedRewardSource
from rlhf_lab.trainers.compute import ComputeMeter
from rlhf_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)


def n_values(k: int) -> list[int]:
    """1, 2, 4, … up to K, and K itself."""
    return sorted({2 ** i for i in range(int(math.log2(k)) + 1)} | {k})


def train_best_of_n(cfg: RunConfig, ctx: RunContext) -> dict:
    a: BestOfNConfig = cfg.algo
    if cfg.task.name != "imdb":
        raise ConfigError("algo=best_of_n needs task=imdb (its prompts and gold reward)")
    if comm.world_size() > 1:
        raise ConfigError("algo=best_of_n samples in one process: run it without torchrun / resources.processes")
    task, sft_dir, rm_dir, used = sampling_stages(cfg, learned_reward=a.scorer == "reward_model")
    # placement and precision only, in one process: nothing is trained, so no strategy a study sets for its other
    # arms (DeepSpeed engines) applies here
    strategy = TorchStrategy(device=cfg.train.device, precision=cfg.train.precision)
    tokenizer = load_tokenizer(sft_dir)
    policy = strategy.place(freeze(load_causal_lm(sft_dir)))
    prompts = task.test_prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else task.test_prompts
    repeated = [ids for p in prompts for ids in [encode_prompt(tokenizer, p)] * a.samples]      # (P·K) prompt rows
    # every seed its own samples: the evaluation seed and the run seed together (other methods vary by training)
    generator = torch.Generator().manual_seed(cfg.eval.seed * 100_003 + cfg.seed)
    meter = ComputeMeter()   # its cost is the K samples per prompt and their scoring, not a training run's
    meter.watch("policy", policy)
    meter.add_samples(len(repeated))
    with strategy.autocast():
        seqs = sample_completions(policy, repeated, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                  max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                                  batch_size=cfg.eval.batch_size, generator=generator, progress="best-of-n: sampling")
        prompt_texts, completions = split_samples(tokenizer, seqs)
        gold = np.asarray(task.gold.score(decode_samples(tokenizer, seqs)), dtype=np.float64)
        proxy = None
        if rm_dir is not None:
            rm, normalization = load_scalar_model(rm_dir)
            source = LearnedRewardSource(strategy.place(freeze(rm), role="reward"), load_tokenizer(rm_dir),
                                         tokenizer, normalization, strategy.device)
            meter.watch("reward", source.model)
            proxy = source.score(prompt_texts, completions, seqs).double().numpy()
    per_prompt = {"gold": gold, "length": seqs.completion_lengths.double().numpy(),
                  "eos": (seqs.completion_ids == tokenizer.eos_token_id).any(-1).double().numpy()}
    if proxy is not None:
        per_prompt["proxy"] = proxy
    per_prompt = {k: v.reshape(len(prompts), a.samples) for k, v in per_prompt.items()}      # (P, K) each
    scores = per_prompt["proxy"] if a.scorer == "reward_model" else per_prompt["gold"]
    unscored = int((~(np.isfinite(scores).all(1) & np.isfinite(per_prompt["gold"]).all(1))).sum())
    if unscored:
        log.warning("best-of-n: %d of %d prompts have a sample without a finite score; they are left out of every "
                    "row", unscored, len(prompts))
    cost = meter.totals()
    meter.close()
    for n in n_values(a.samples):
        step = 0 if n == 1 else n
        expected = {k: expected_best_of_n(scores, v, n) for k, v in per_prompt.items()}      # (P,) each
        result = _row_result(expected, n, len(repeated), cfg.eval.temperature)
        ctx.points.write(point_row(ctx.identity, step, result, proxy_reward=result.proxy_reward_mean,
                                   cost=_share_of_cost(cost, n / a.samples)))
        ctx.logger.log(result.as_metrics(), step)
    records = sample_records(prompt_texts, completions, gold, seqs.completion_lengths.tolist(), cfg.eval.temperature)
    best = np.argmax(scores, axis=1)                                                            # (P,) first max
    write_samples(ctx.run_dir, 0, _reindex([records[p * a.samples] for p in range(len(prompts))]))
    write_samples(ctx.run_dir, a.samples, _reindex([records[p * a.samples + b] for p, b in enumerate(best)]))
    return {"stage_seconds": stage_seconds(used), "samples_per_prompt": a.samples, "scorer": a.scorer,
            "reward_model": None if rm_dir is None else str(rm_dir)}


def _row_result(expected: dict[str, np.ndarray], n: int, samples: int, temperature: float) -> EvalResult:
    """One points row: per-prompt expectations of the best-of-n sample, averaged over prompts."""
    gold_mean, gold_se = mean_se(expected["gold"][np.isfinite(expected["gold"])])
    return EvalResult(samples=samples, kl_mean=kl_bound(n), kl_se=0.0, kl_sampled_mean=math.nan,
                      kl_sampled_se=math.nan, gold_reward_mean=gold_mean, gold_reward_se=gold_se,
                      response_len_mean=float(np.nanmean(expected["length"])),
                      eos_fraction=float(np.nanmean(expected["eos"])), temperature=temperature,
                      proxy_reward_mean=float(np.nanmean(expected["proxy"])) if "proxy" in expected else math.nan)


def _share_of_cost(cost: dict, fraction: float) -> dict:
    """What best-of-n costs: n of the K samples per prompt and their scoring (every count scales with n); wall
    time and memory are the whole run's."""
    return {k: (v if k in ("train_seconds", "peak_rss_mib") else round(v * fraction)) for k, v in cost.items()}


def _reindex(records: list[dict]) -> list[dict]:
    """Evaluation-row indices 0…P−1, as every method's samples files have them (judges pair rows by index)."""
    return [{**r, "index": i} for i, r in enumerate(records)]
