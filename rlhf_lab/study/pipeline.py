"""One alignment run, end to end: cached stages → training (DPO family or PPO) with evaluation → points in the run dir.

This is the only place that sees the whole `RunConfig`; each component receives its own group.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lab.config import PPOConfig, RunConfig, to_container
from rlhf_lab.data.formats import load_preference_pairs
from rlhf_lab.data.tokenize import TruncationConfig, encode_prompt, tokenize_pairs
from rlhf_lab.distributed.strategy import make_strategy
from rlhf_lab.eval.points import PointsWriter, RunIdentity
from rlhf_lab.models.build import frozen_copy, load_causal_lm, load_tokenizer
from rlhf_lab.study import stages
from rlhf_lab.tracking.logger import RunLogger
from rlhf_lab.tracking.run_info import write_run_info
from rlhf_lab.utils.cache import COMPLETE_MARKER, atomic_write_text, is_complete, stable_hash
from rlhf_lab.utils.errors import UserError
from rlhf_lab.utils.lock import file_lock

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def stage_seconds(outputs: list[stages.StageOutput]) -> dict[str, float]:
    return {o.name: o.seconds for o in outputs}


def prepare_data(cfg: RunConfig, device: torch.device) -> PreparedData:
    """Build or reuse every stage this run needs; return tokenised pairs and the cached reference table."""
    cache = Path(cfg.cache_dir)
    used: list[stages.StageOutput] = []
    task = None
    if cfg.task.name == "imdb":
        task, task_out = stages.task_stage(cfg.task, cfg.reward.gold, cache)
        used.append(task_out)
    if task is not None and cfg.model.sft:
        make = lambda: make_strategy(cfg.train.device, cfg.train.precision, 1, cfg.optim.max_grad_norm)  # noqa: E731
        sft = stages.sft_stage(cache, task, task.tokenizer_key, cfg.model, cfg.sft, cfg.task.seed, make)
        used.append(sft)
        reference_dir, reference_key = sft.dir, sft.key
    else:
        reference_dir, reference_key = Path(cfg.model.name_or_path), stable_hash({"model": cfg.model.name_or_path})
    tokenizer = load_tokenizer(reference_dir)
    if cfg.data.source is None:
        prefs = stages.preference_stage(cache, task, reference_key, reference_dir, cfg.preferences,
                                        cfg.reward.gold, cfg.task.seed, device)
        used.append(prefs)
        source, data_key = str(prefs.dir / "pairs.jsonl"), prefs.key
    else:
        source, data_key = cfg.data.source, stable_hash({"source": cfg.data.source, "split": cfg.data.split})
    pairs, report = load_preference_pairs(source, cfg.data.split, tokenizer)
    trunc = TruncationConfig(cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.data.truncation)
    tokenized, tok_report = tokenize_pairs(pairs, tokenizer, trunc, source=source)
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
                        [encode_prompt(tokenizer, p) for p in prompts], task.gold if task else None, used)


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


@dataclass
class RunContext:
    """What every trainer receives from the shared run prologue."""

    run_dir: Path
    identity: RunIdentity
    logger: RunLogger
    points: PointsWriter


def run_identity(cfg: RunConfig) -> RunIdentity:
    a = cfg.algo
    if isinstance(a, PPOConfig):
        method = {"learned": "ppo", "gold": "ppo_gt", "callable": "ppo_custom"}[a.reward]
        knob = f"target{a.target_kl:g}" if a.adaptive_kl else f"kl{a.kl_coef:g}"
        run_id = cfg.run_id or f"{method}-{knob}-seed{cfg.seed}"
        return RunIdentity(cfg.study, run_id, method, "ppo", cfg.seed, kl_coef=a.kl_coef,
                           target_kl=a.target_kl if a.adaptive_kl else None)
    run_id = cfg.run_id or f"dpo-{a.loss_type}-beta{a.beta:g}-seed{cfg.seed}"
    return RunIdentity(cfg.study, run_id, "dpo", a.loss_type, cfg.seed, beta=a.beta)


def build_run_stages(cfg: RunConfig) -> list[stages.StageOutput]:
    """Build (or find in the cache) every shared stage the run `cfg` needs, without training: what a study's
    stages phase runs before its sweep points, so array jobs find them ready."""
    from rlhf_lab.study.run_ppo import ppo_stages

    device = make_strategy(cfg.train.device, cfg.train.precision, 1, cfg.optim.max_grad_norm).device
    if isinstance(cfg.algo, PPOConfig):
        return ppo_stages(cfg, device)[3]
    return prepare_data(cfg, device).stages


RUN_LOCK = ".run.lock"


def run_alignment(cfg: RunConfig, run_dir: Path) -> dict:
    """Train and evaluate one sweep point; skip it if its run directory is already complete (unless forced).

    PPO runs with a checkpoint in their directory resume from it; anything else incomplete starts afresh. The run
    holds a lock on its directory, so two jobs given the same point (a requeued array task racing its first
    attempt) never write into it at once; `rlhf-lab status` reads the lock to tell running from interrupted."""
    run_dir = Path(run_dir)
    if is_complete(run_dir) and not cfg.force:
        log.info("run %s is complete; skipping (force=true to rerun)", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / RUN_LOCK):
        if is_complete(run_dir) and not cfg.force:  # finished by another job while we waited
            return json.loads((run_dir / "summary.json").read_text())
        return _run_locked(cfg, run_dir)


def _run_locked(cfg: RunConfig, run_dir: Path) -> dict:
    from rlhf_lab.study.run_ppo import train_ppo

    (run_dir / "error.txt").unlink(missing_ok=True)
    is_ppo = isinstance(cfg.algo, PPOConfig)
    resume_step = _prepare_run_dir(run_dir, resumable=is_ppo and not cfg.force)
    started = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    resolved = to_container(cfg)
    git = write_run_info(run_dir, resolved)
    identity = run_identity(cfg)
    tags = [identity.method, f"loss:{identity.loss_type}", f"seed:{cfg.seed}", f"git:{(git['sha'] or 'none')[:8]}"]
    tags += [f"beta:{identity.beta:g}"] if identity.beta is not None else [f"kl_coef:{identity.kl_coef:g}"]
    is_main = int(os.environ.get("RANK", "0")) == 0
    logger = RunLogger(run_dir, cfg.logger, resolved, name=identity.run_id, group=cfg.study, tags=tags,
                       is_main=is_main)
    points = PointsWriter(run_dir / "points.csv")
    ctx = RunContext(run_dir, identity, logger, points)
    try:
        details = train_ppo(cfg, ctx) if is_ppo else train_dpo(cfg, ctx)
    finally:
        points.close()
        logger.close()
    summary = {"run_id": identity.run_id, "method": identity.method, "seconds": time.time() - started,
               "resumed_from_step": resume_step, "peak_rss_mib": peak_rss_mib(), **details}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    (run_dir / COMPLETE_MARKER).write_text("ok\n")
    return summary


def train_dpo(cfg: RunConfig, ctx: RunContext) -> dict:
    from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer

    strategy = make_strategy(cfg.train.device, cfg.train.precision,
                             cfg.train.batch_size // cfg.train.micro_batch_size, cfg.optim.max_grad_norm)
    data = prepare_data(cfg, strategy.device)
    reference = frozen_copy(load_causal_lm(data.reference_dir))
    seed_everything(cfg.seed)
    policy = load_causal_lm(data.reference_dir)
    inputs = DPOInputs(policy, reference, data.tokenizer, data.pairs, data.reference_table,
                       data.eval_prompt_ids, data.gold, ctx.identity)
    trainer = DPOTrainer(inputs, cfg.algo, cfg.optim, cfg.train, cfg.eval, strategy, ctx.logger, ctx.points, cfg.seed)
    final = trainer.train()
    if cfg.train.save_model:
        strategy.save_model(ctx.run_dir / "model", data.tokenizer)
    return {"stage_seconds": stage_seconds(data.stages), "pairs": len(data.pairs), "final_train_metrics": final}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prepare_run_dir(run_dir: Path, resumable: bool) -> int | None:
    """Make an incomplete run directory safe to (re)start in; return the step a resumable run continues from.

    Without a checkpoint (or for runs that cannot resume) the previous attempt's points and metrics are removed so
    nothing is double-counted; with one, rows logged after the checkpoint's step are dropped (they are recomputed).
    """
    from rlhf_lab.trainers.checkpoint import latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resumable else None
    if checkpoint is None:
        for name in ("points.csv", "metrics.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
        if (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir / "checkpoints")
        return None
    step = int(checkpoint.name.split("-")[1])
    truncate_rows_after(run_dir / "metrics.jsonl", step, jsonl=True)
    truncate_rows_after(run_dir / "points.csv", step, jsonl=False)
    return step


def truncate_rows_after(path: Path, step: int, jsonl: bool) -> None:
    """Drop logged rows whose step is beyond `step` (rewritten atomically)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if jsonl:
        kept = [line for line in lines if json.loads(line)["step"] <= step]
    else:
        header, rows = lines[:1], lines[1:]
        step_col = header[0].split(",").index("step") if header else 0
        kept = header + [r for r in rows if int(next(csv.reader([r]))[step_col]) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
