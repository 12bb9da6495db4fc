"""One alignment run, end to end: cached stages → DPO-family training with evaluation → points in the run dir.

This is the only place that sees the whole `RunConfig`; each component receives its own group.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_lab.config import RunConfig, to_container
from rlhf_lab.data.formats import load_preference_pairs
from rlhf_lab.data.tokenize import TruncationConfig, encode_prompt, tokenize_pairs
from rlhf_lab.distributed.strategy import make_strategy
from rlhf_lab.eval.points import PointsWriter, RunIdentity
from rlhf_lab.models.build import frozen_copy, load_causal_lm, load_tokenizer
from rlhf_lab.study import stages
from rlhf_lab.tracking.logger import RunLogger
from rlhf_lab.tracking.run_info import write_run_info
from rlhf_lab.utils.cache import COMPLETE_MARKER, atomic_write_text, is_complete, stable_hash

log = logging.getLogger(__name__)


def default_run_id(cfg: RunConfig) -> str:
    return f"dpo-{cfg.algo.loss_type}-beta{cfg.algo.beta:g}-seed{cfg.seed}"


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
    stage_times: dict[str, float]


def prepare_data(cfg: RunConfig, device: torch.device) -> PreparedData:
    """Build or reuse every stage this run needs; return tokenised pairs and the cached reference table."""
    cache = Path(cfg.cache_dir)
    times: dict[str, float] = {}
    task = stages.build_task(cfg.task, cfg.reward.gold, cache) if cfg.task.name == "imdb" else None
    if task is not None and cfg.model.sft:
        make = lambda: make_strategy(cfg.train.device, cfg.train.precision, 1, cfg.optim.max_grad_norm)  # noqa: E731
        sft = stages.sft_stage(cache, task, task.key, cfg.model, cfg.sft, cfg.task.seed, make)
        times["sft"] = sft.seconds
        reference_dir, reference_key = sft.dir, sft.key
    else:
        reference_dir, reference_key = Path(cfg.model.name_or_path), stable_hash({"model": cfg.model.name_or_path})
    tokenizer = load_tokenizer(reference_dir)
    if cfg.data.source is None:
        prefs = stages.preference_stage(cache, task, reference_key, reference_dir, cfg.preferences,
                                        cfg.reward.gold, cfg.task.seed, device)
        times["preferences"] = prefs.seconds
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
    ref_stage, table = stages.reference_logps_stage(
        cache, reference_key, reference_dir, data_key, tokenized, report.total_rows, tokenizer.pad_token_id,
        trunc, device)
    times["reference_logps"] = ref_stage.seconds
    prompts = task.test_prompts if task is not None else [p.prompt for p in pairs[-256:]]
    prompts = prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else prompts
    return PreparedData(tokenizer, reference_dir, reference_key, tokenized, table,
                        [encode_prompt(tokenizer, p) for p in prompts], task.gold if task else None, times)


def run_alignment(cfg: RunConfig, run_dir: Path) -> dict:
    """Train and evaluate one sweep point; skip it if its run directory is already complete (unless forced)."""
    from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer

    run_dir = Path(run_dir)
    if is_complete(run_dir) and not cfg.force:
        log.info("run %s is complete; skipping (force=true to rerun)", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    _reset_run_dir(run_dir)
    started = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    resolved = to_container(cfg)
    git = write_run_info(run_dir, resolved)
    strategy = make_strategy(cfg.train.device, cfg.train.precision,
                             cfg.train.batch_size // cfg.train.micro_batch_size, cfg.optim.max_grad_norm)
    data = prepare_data(cfg, strategy.device)
    run_id = cfg.run_id or default_run_id(cfg)
    identity = RunIdentity(study=cfg.study, run_id=run_id, method="dpo", loss_type=cfg.algo.loss_type,
                           seed=cfg.seed, beta=cfg.algo.beta)
    reference = frozen_copy(load_causal_lm(data.reference_dir))
    seed_everything(cfg.seed)
    policy = load_causal_lm(data.reference_dir)
    tags = ["dpo", f"loss:{cfg.algo.loss_type}", f"beta:{cfg.algo.beta:g}", f"seed:{cfg.seed}",
            f"git:{(git['sha'] or 'none')[:8]}"]
    logger = RunLogger(run_dir, cfg.logger, resolved, name=run_id, group=cfg.study, tags=tags,
                       is_main=strategy.is_main)
    points = PointsWriter(run_dir / "points.csv")
    try:
        inputs = DPOInputs(policy, reference, data.tokenizer, data.pairs, data.reference_table,
                           data.eval_prompt_ids, data.gold, identity)
        trainer = DPOTrainer(inputs, cfg.algo, cfg.optim, cfg.train, cfg.eval, strategy, logger, points, cfg.seed)
        final = trainer.train()
        if cfg.train.save_model:
            strategy.save_model(run_dir / "model", data.tokenizer)
    finally:
        points.close()
        logger.close()
    summary = {"run_id": run_id, "seconds": time.time() - started, "stage_seconds": data.stage_times,
               "pairs": len(data.pairs), "final_train_metrics": final}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    (run_dir / COMPLETE_MARKER).write_text("ok\n")
    return summary


def _reset_run_dir(run_dir: Path) -> None:
    """An incomplete run directory (killed or failed earlier) is cleared so its points are not double-counted."""
    for name in ("points.csv", "metrics.jsonl", "summary.json", COMPLETE_MARKER):
        (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
