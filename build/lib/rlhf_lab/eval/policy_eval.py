"""Evaluation shared by every method (DPO family, PPO, PPO-GT): sample on held-out prompts, score the gold
reward, and measure the sequence-level KL(π‖π_ref) on the policy's own samples at the evaluation temperature.

Two KL figures per sequence: `kl` is the exact per-token KL over the full vocabulary summed over
the completion — the DPO paper's "sum of per-timestep KLs", always ≥ 0, low variance; `kl_sampled` is the
single-sample log-ratio Σ_t log π(y_t)/π_ref(y_t), an unbiased but noisy estimate of the same quantity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from rlhf_lab.config import EvalConfig
from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.distributed import comm
from rlhf_lab.models.logprobs import sequence_kl
from rlhf_lab.models.sampling import sample_completions


@dataclass
class EvalResult:
    samples: int
    kl_mean: float              # exact sequence KL (nats), mean over samples
    kl_se: float                # its standard error
    kl_sampled_mean: float      # sampled log-ratio estimate
    kl_sampled_se: float
    gold_reward_mean: float     # NaN when the task has no gold reward
    gold_reward_se: float
    response_len_mean: float    # completion tokens, eos included
    eos_fraction: float         # share of samples that ended with EOS within max_new_tokens
    temperature: float
    proxy_reward_mean: float = math.nan  # the training reward (e.g. the learned RM) on the same samples
    # one dict per sample (index, prompt, completion, gold, length, temperature): written to
    # <run_dir>/samples/step_XXXXXX.jsonl for judges (eval/samples.py); not a metric
    records: list[dict] = field(default_factory=list, repr=False)

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items() if k != "records"}


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sample std / √n)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), se


def decode_samples(tokenizer, seqs: SequenceBatch) -> list[str]:
    """Prompt + completion text (special tokens dropped): what the gold reward scores."""
    ids = seqs.input_ids.tolist()
    keep = seqs.attention_mask.tolist()
    texts = []
    for row, mask in zip(ids, keep):
        texts.append(tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True))
    return texts


def split_samples(tokenizer, seqs: SequenceBatch) -> tuple[list[str], list[str]]:
    """Prompt texts and completion texts (special tokens dropped), row by row."""
    prompts = [[t for t, m in zip(r, k) if m] for r, k in
               zip(seqs.input_ids[:, : seqs.prompt_width].tolist(), seqs.attention_mask[:, : seqs.prompt_width].tolist())]
    completions = [[t for t, m in zip(r, k) if m] for r, k in
                   zip(seqs.completion_ids.tolist(), seqs.completion_mask.tolist())]
    return (tokenizer.batch_decode(prompts, skip_special_tokens=True),
            tokenizer.batch_decode(completions, skip_special_tokens=True))


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompt_ids: list[list[int]], gold, cfg: EvalConfig,
                    proxy_reward=None, sync_finish: bool = False, progress: str = "evaluation") -> EvalResult:
    """Sample cfg.samples_per_prompt completions per prompt from `policy` and score them (see module doc).

    `proxy_reward` (a rewards.source.RewardSource, optional) also scores the samples: for PPO the learned reward
    model, so over-optimisation (proxy up, gold down) shows in the points table.

    With several processes each rank samples and scores rows i % W == r (its share padded by one repeated row
    so that every rank runs the same number of forwards, which collective ZeRO-3 forwards need) and the
    per-sample results are gathered: the uniforms that drive sampling are drawn for all rows from one seeded
    generator, so the samples, and the points row, do not depend on the world size."""
    prompts = [p for p in prompt_ids for _ in range(cfg.samples_per_prompt)]
    uniforms = torch.rand(len(prompts), cfg.max_new_tokens, generator=torch.Generator().manual_seed(cfg.seed))
    rows = comm.shard(list(range(len(prompts))))
    padded = rows + [rows[-1] if rows else 0] * (-(-len(prompts) // comm.world_size()) - len(rows))
    local = _score_rows(policy, reference, tokenizer, [prompts[i] for i in padded], uniforms[padded], gold, cfg,
                        proxy_reward, sync_finish, progress)
    local = {k: v[: len(rows)] for k, v in local.items()}
    shares = comm.all_gather_object(local)
    merged = {k: comm.unshard([s[k] for s in shares]) for k in local}
    exact, sampled = np.asarray(merged["kl"]), np.asarray(merged["kl_sampled"])
    lengths, ended = np.asarray(merged["length"], dtype=np.float64), np.asarray(merged["eos"], dtype=np.float64)
    gold_scores = np.asarray(merged["gold"], dtype=np.float64) if gold else None
    kl_m, kl_s = mean_se(exact)
    kls_m, kls_s = mean_se(sampled)
    g_m, g_s = mean_se(gold_scores if gold else np.array([]))
    proxy = math.nan
    if proxy_reward is not None:
        scores = np.asarray(merged["proxy"], dtype=np.float64)
        proxy = float(scores[np.isfinite(scores)].mean()) if np.isfinite(scores).any() else math.nan
    return EvalResult(
        samples=len(prompts), kl_mean=kl_m, kl_se=kl_s, kl_sampled_mean=kls_m, kl_sampled_se=kls_s,
        gold_reward_mean=g_m, gold_reward_se=g_s, response_len_mean=float(lengths.mean()),
        eos_fraction=float(ended.mean()), temperature=cfg.temperature, proxy_reward_mean=proxy,
        records=sample_records(merged["prompt"], merged["completion"], gold_scores, lengths, cfg.temperature),
    )


def _score_rows(policy, reference, tokenizer, prompts, uniforms, gold, cfg: EvalConfig, proxy_reward,
                sync_finish: bool, progress: str) -> dict[str, list]:
    """Per-sample results for this rank's rows: KL both ways, length, EOS, texts, gold and proxy scores."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    seqs = sample_completions(
        policy, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
        uniforms=uniforms, sync_finish=sync_finish, progress=f"{progress}: sampling",
    )
    kl_exact, kl_sampled = [], []
    for start in range(0, len(seqs), cfg.batch_size):
        chunk = _slice(seqs, start, start + cfg.batch_size).to(device)
        terms = sequence_kl(policy, reference, chunk, cfg.temperature)
        kl_exact.append(terms.exact.cpu())
        kl_sampled.append(terms.sampled.cpu())
    policy.train(was_training)
    prompt_texts, completions = split_samples(tokenizer, seqs)
    out = {"kl": torch.cat(kl_exact).double().tolist(), "kl_sampled": torch.cat(kl_sampled).double().tolist(),
           "length": seqs.completion_lengths.tolist(),
           "eos": (seqs.completion_ids == tokenizer.eos_token_id).any(-1).tolist(),
           "prompt": prompt_texts, "completion": completions}
    if gold:
        out["gold"] = np.asarray(gold.score(decode_samples(tokenizer, seqs)), dtype=np.float64).tolist()
    if proxy_reward is not None:
        out["proxy"] = proxy_reward.score(prompt_texts, completions, seqs).double().tolist()
    return out


def sample_records(prompts: list[str], completions: list[str], gold_scores, lengths, temperature: float) -> list[dict]:
    """Per-sample records; `index` is the evaluation row, identical across steps (same prompts, same order)."""
    return [{"index": i, "prompt": p, "completion": c,
             "gold": float(gold_scores[i]) if gold_scores is not None else None,
             "length": int(lengths[i]), "temperature": temperature}
            for i, (p, c) in enumerate(zip(prompts, completions))]


def _slice(seqs: SequenceBatch, start: int, end: int) -> SequenceBatch:
    return SequenceBatch(seqs.input_ids[start:end], seqs.attention_mask[start:end],
                         seqs.completion_mask[start:end], seqs.prompt_width)
