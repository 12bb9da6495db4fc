"""The DPO-family recipe: stages (task, SFT, preferences, reference log-probs) → policy + reference → DPOTrainer.

One function per concern: `prepare_data` builds or reuses every stage and tokenises the pairs; `train_dpo` wires
the strategy, models and trainer for one run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lab.config import RunConfig
from rlhf_lab.algos.preference import UNPAIRED_LOSSES
from rlhf_lab.data.formats import is_unpaired, load_preference_records, parse_examples
from rlhf_lab.data.tokenize import TruncationConfig, encode_prompt, tokenize_pairs, tokenize_unpaired
from rlhf_lab.distributed.strategy import resolve_device
from rlhf_lab.models.build import freeze, load_causal_lm, load_tokenizer
from rlhf_lab.recipes import stages
from rlhf_lab.recipes.label_stages import labelled_pairs
from rlhf_lab.recipes.run import RunContext, seed_everything, trainer_strategy
from rlhf_lab.recipes.stage_keys import base_model_key, source_data_key
from rlhf_lab.trainers.loop import accumulation_steps
from rlhf_lab.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: object
    reference_dir: Path
    reference_key: str
    pairs: list
    reference_table: torch.Tensor | None
    eval_prompt_ids: list[list[int]]
    gold: object | None
    stages: list[stages.StageOutput]      # every cached stage this run used, in build order
    labels: dict | None = None            # who relabelled / filtered the pairs (recipes/label_stages.py), if any


def stage_seconds(outputs: list[stages.StageOutput]) -> dict[str, float]:
    return {o.name: o.seconds for o in outputs}


def stage_training(cfg: RunConfig) -> stages.StageTraining:
    """How this run's SFT / reward-model stages train: its optim group, precision and strategy."""
    return stages.StageTraining(cfg.optim, cfg.train.precision,
                                lambda accum, clip, micro: trainer_strategy(cfg, accum, clip, micro),
                                cfg.train.checkpoint_every)


def sft_or_base(cfg: RunConfig, task, used: list) -> tuple[Path, str]:
    """The model every arm starts from: the task's SFT stage, or the configured pretrained model as is."""
    if task is not None and cfg.model.sft:
        sft = stages.sft_stage(Path(cfg.cache_dir), task, task.tokenizer_key, cfg.model, cfg.sft, cfg.task.seed,
                               stage_training(cfg))
        used.append(sft)
        return sft.dir, sft.key
    return Path(cfg.model.name_or_path), base_model_key(cfg.model.name_or_path)


def user_records(cfg: RunConfig) -> tuple[list[dict], str] | None:
    """The user's dataset (`data.source`), read and checked against the loss before any stage trains: an
    unpaired (prompt/completion/label) file trains only unpaired losses (KTO)."""
    if cfg.data.source is None:
        return None
    records, name = load_preference_records(cfg.data.source, cfg.data.split)
    if is_unpaired(records) and cfg.algo.loss_type not in UNPAIRED_LOSSES:
        raise ConfigError(
            f"data.source {name}: unpaired rows (prompt/completion/label) train only algo.loss_type in "
            f"{sorted(UNPAIRED_LOSSES)}, not {cfg.algo.loss_type!r}; paired losses need prompt/chosen/rejected")
    return records, name


def prepare_data(cfg: RunConfig, device: torch.device) -> PreparedData:
    """Build or reuse every stage this run needs; return tokenised pairs (or, for an unpaired KTO dataset,
    tokenised examples) and the cached reference table."""
    cache = Path(cfg.cache_dir)
    used: list[stages.StageOutput] = []
    user, labels = user_records(cfg), None
    task = None
    if cfg.task.name == "imdb":
        task, task_out = stages.task_stage(cfg.task, cfg.reward.gold, cache)
        used.append(task_out)
    reference_dir, reference_key = sft_or_base(cfg, task, used)
    tokenizer = load_tokenizer(reference_dir)
    if cfg.data.source is None:
        prefs = stages.preference_stage(cache, task, reference_key, reference_dir, cfg.preferences,
                                        cfg.reward.gold, cfg.task.seed, device)
        used.append(prefs)
        prefs, labels = labelled_pairs(cfg, task, prefs, reference_key, reference_dir, device, used)
        source, data_key = str(prefs.dir / "pairs.jsonl"), prefs.key
        user = load_preference_records(source)
    else:
        source, data_key = cfg.data.source, source_data_key(cfg.data.source, cfg.data.split)
    pairs, report = parse_examples(*user, tokenizer)
    trunc = TruncationConfig(cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.data.truncation)
    tokenize = tokenize_unpaired if is_unpaired(user[0]) else tokenize_pairs
    tokenized, tok_report = tokenize(pairs, tokenizer, trunc, source=source)
    log.info("%s", report.summary())
    log.info("%s", tok_report.summary())
    if cfg.data.max_pairs is not None:
        order = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(cfg.task.seed)).tolist()
        tokenized = [tokenized[i] for i in sorted(order[: cfg.data.max_pairs])]
    if task is not None:
        prompts = task.test_prompts
    else:  # no task: hold out the prompts of the last pairs for evaluation and never train on them
        tokenized, prompts = hold_out_prompts(tokenized, pairs, cfg.eval.num_prompts or 256)
    prompts = prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else prompts
    ref_stage, table = stages.reference_logps_stage(
        cache, reference_key, reference_dir, data_key, tokenized, report.total_rows, tokenizer.pad_token_id,
        trunc, device)
    used.append(ref_stage)
    return PreparedData(tokenizer, reference_dir, reference_key, tokenized, table,
                        [encode_prompt(tokenizer, p) for p in prompts], task.gold if task else None, used,
                        labels or None)


def hold_out_prompts(tokenized: list, pairs: list, num_prompts: int) -> tuple[list, list[str]]:
    """Split off the pairs of the last `num_prompts` distinct prompts: their prompts become evaluation prompts."""
    prompt_of_row = {p.row: p.prompt for p in pairs}
    held: list[str] = []
    for item in reversed(tokenized):
        text = prompt_of_row[item.index]
        if text not in held:
            if len(held) == num_prompts:
                break
            held.append(text)
    held_set = set(held)
    train = [t for t in tokenized if prompt_of_row[t.index] not in held_set]
    if not train:
        raise UserError(f"data.source has only {len(held)} distinct prompts; none left for training after holding "
                        f"out {num_prompts} for evaluation (lower eval.num_prompts)")
    log.info("held out %d prompts (%d pairs) for evaluation", len(held), len(tokenized) - len(train))
    return train, held


def train_dpo(cfg: RunConfig, ctx: RunContext) -> dict:
    from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer

    accum = accumulation_steps(cfg.train.batch_size, cfg.train.micro_batch_size, "train.batch_size")
    strategy = trainer_strategy(cfg, accum, cfg.optim.max_grad_norm, cfg.train.micro_batch_size)
    data = prepare_data(cfg, resolve_device(cfg.train.device))
    policy, reference = dpo_models(cfg, data.reference_dir, strategy)
    inputs = DPOInputs(policy, reference, data.tokenizer, data.pairs, data.reference_table,
                       data.eval_prompt_ids, data.gold, ctx.identity)
    trainer = DPOTrainer(inputs, cfg.algo, cfg.optim, cfg.train, cfg.eval, strategy, ctx.logger, ctx.points,
                         cfg.seed, run_dir=ctx.run_dir, config_hash=ctx.config_hash)
    final = trainer.train()
    if cfg.train.save_model:
        save_policy(cfg, strategy, ctx.run_dir, data.reference_dir, data.tokenizer)
    return {"stage_seconds": stage_seconds(data.stages), "pairs": len(data.pairs), "final_train_metrics": final,
            "compute_per_role": trainer.meter.per_role(), **lora_summary(cfg, strategy),
            **({"preference_labels": data.labels} if data.labels else {})}


def dpo_models(cfg: RunConfig, base_dir: Path, strategy) -> tuple:
    """(policy, reference), unplaced. Full fine-tuning: two models from `base_dir`, the reference loaded afresh
    (never deep-copied: ZeRO-3 builds it partitioned). LoRA (lora.r set): one model; the policy is its adapters and
    the reference is the same module with them off, which is exactly the model the cached reference table scored."""
    if cfg.lora.r is None:
        with strategy.loading("reference"):    # ZeRO-3: built partitioned, never whole on one rank
            reference = freeze(load_causal_lm(base_dir))
    seed_everything(cfg.seed)
    with strategy.loading("trained"):
        policy = load_causal_lm(base_dir)
    if cfg.lora.r is None:
        return policy, reference
    from rlhf_lab.models.lora import AdapterOffReference, wrap_causal_lm

    policy = wrap_causal_lm(policy, cfg.lora, cfg.seed)
    return policy, AdapterOffReference(policy)


def save_policy(cfg: RunConfig, strategy, run_dir: Path, base_dir: Path, tokenizer) -> None:
    """The final policy as an HF causal LM in `run_dir/model` (collective); with LoRA the adapters merged into the
    base, and the adapter itself in `run_dir/adapter`."""
    if cfg.lora.r is None:
        strategy.save_hf(run_dir / "model", tokenizer)
        return
    from rlhf_lab.models.lora import export_lora

    export_lora(strategy, run_dir, base_dir, tokenizer)


def lora_summary(cfg: RunConfig, strategy) -> dict:
    """summary.json's record of what trained: the policy's trainable and total parameters (LoRA runs only)."""
    if cfg.lora.r is None:
        return {}
    from rlhf_lab.models.lora import trainable_parameters

    trainable, total = trainable_parameters(strategy.unwrap())
    return {"lora": {"r": cfg.lora.r, "trainable_params": trainable, "total_params": total}}
