"""The run driver every recipe shares: one sweep point, end to end, on one or many processes.

    run directory (lock, resume or clean start, config + versions + git SHA) → recipe (stages → models →
    trainer → evaluation → HF export) → summary.json and the completion marker

Under torchrun / srun only rank 0 touches the run directory's lock and files; the other ranks follow its
decisions (broadcast), so no rank ever waits on a file lock while another waits in a collective (the hang a
two-process run used to hit when both ranks queued on the same lock).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lab.config import BestOfNConfig, CriticFreeConfig, OnlineDPOConfig, PPOConfig, RunConfig, to_container
from rlhf_lab.distributed import comm
from rlhf_lab.distributed.strategy import make_strategy, resolve_device
from rlhf_lab.eval.points import PointsWriter, RunIdentity
from rlhf_lab.recipes.pair_labels import dpo_method
from rlhf_lab.tracking.logger import RunLogger
from rlhf_lab.trainers.compute import peak_rss_mib
from rlhf_lab.tracking.run_info import write_run_info
from rlhf_lab.utils.cache import (COMPLETE_MARKER, atomic_write_text, damage, is_complete, is_legacy, mark_complete,
                                  stable_hash)
from rlhf_lab.utils.errors import UserError
from rlhf_lab.utils.lock import file_lock
from rlhf_lab.utils.progress import reporting_to

log = logging.getLogger(__name__)

RUN_LOCK = ".run.lock"
PROGRESS_FILE = "progress.json"   # the run's current phase, done / total, rate, ETA (utils/progress.py)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """What every recipe receives from the shared run prologue."""

    run_dir: Path
    identity: RunIdentity
    logger: RunLogger
    points: PointsWriter | None       # rank 0 only
    config_hash: str                  # a checkpoint resumes only the configuration that wrote it


def run_identity(cfg: RunConfig) -> RunIdentity:
    """Method, variant and the knob a sweep moves, as the points table, the frontier and W&B name them; the run id
    spells out every parameter that makes two runs different settings (the frontier tells settings apart by it),
    LoRA included: a LoRA arm never shares a directory or a curve with full training."""
    a, r = cfg.algo, cfg.lora.r
    seed = (f"lora{r}-" if r is not None else "") + f"seed{cfg.seed}"
    if isinstance(a, PPOConfig):
        method = {"learned": "ppo", "gold": "ppo_gt", "callable": "ppo_custom"}[a.reward]
        knob = f"target{a.target_kl:g}" if a.adaptive_kl else f"kl{a.kl_coef:g}"
        run_id = cfg.run_id or f"{method}-{knob}-{seed}"
        return RunIdentity(cfg.study, run_id, method, "ppo", cfg.seed, kl_coef=a.kl_coef,
                           target_kl=a.target_kl if a.adaptive_kl else None, lora_r=r)
    if isinstance(a, CriticFreeConfig):
        method = a.name + {"learned": "", "gold": "_gt", "callable": "_custom"}[a.reward]
        run_id = cfg.run_id or f"{method}-kl{a.kl_coef:g}-k{a.samples_per_prompt}-{seed}"
        return RunIdentity(cfg.study, run_id, method, a.name, cfg.seed, kl_coef=a.kl_coef, lora_r=r)
    if isinstance(a, OnlineDPOConfig):   # online_dpo | iterative_dpo, @annotator unless the gold reward labels
        method = ("online_dpo" if a.refresh_every == 1 else "iterative_dpo") + \
            ("" if a.annotator == "gold" else f"@{a.annotator}")
        every = "" if a.refresh_every == 1 else f"-every{a.refresh_every}"
        flip = f"-flip{a.annotator_flip_rate:g}" if a.annotator_flip_rate else ""
        run_id = cfg.run_id or (f"{method.split('@')[0]}-{a.loss_type}-beta{a.beta:g}-"
                                f"{a.annotator.replace(':', '-')}{every}{flip}-{seed}")
        return RunIdentity(cfg.study, run_id, method, a.loss_type, cfg.seed, beta=a.beta, lora_r=r)
    if isinstance(a, BestOfNConfig):   # its setting is n, which is the row's step (recipes/best_of_n.py)
        run_id = cfg.run_id or f"best_of_n-{a.scorer}-k{a.samples}-{seed}"
        return RunIdentity(cfg.study, run_id, "best_of_n", a.scorer, cfg.seed)
    method = dpo_method(cfg.preferences, cfg.data.source)   # dpo | fdpo, @labeler unless gold labels
    slug = method.replace("@", "-").replace(":", "-")
    if a.loss_type in ("sft", "unlikelihood"):   # the DPO paper's baselines: β only scales their logged rewards
        knob = f"-alpha{a.unlikelihood_alpha:g}" if a.loss_type == "unlikelihood" else ""
        return RunIdentity(cfg.study, cfg.run_id or f"{slug}-{a.loss_type}{knob}-{seed}", method, a.loss_type,
                           cfg.seed, lora_r=r)
    run_id = cfg.run_id or f"{slug}-{a.loss_type}-beta{a.beta:g}-{seed}"
    return RunIdentity(cfg.study, run_id, method, a.loss_type, cfg.seed, beta=a.beta, lora_r=r)


def learns_reward_model(a) -> bool:
    """Whether an on-policy method without a critic needs the reward-model stage (to score or to label)."""
    return getattr(a, "reward", None) == "learned" or getattr(a, "annotator", None) == "reward_model"


def trainer_strategy(cfg: RunConfig, grad_accum: int, max_grad_norm: float | None, micro_batch_size: int):
    """The configured strategy for one trained model of this run."""
    return make_strategy(cfg.strategy, cfg.train.device, cfg.train.precision, grad_accum, max_grad_norm,
                         micro_batch_size)


def resume_key(cfg: RunConfig) -> str:
    """What must match for a checkpoint to be resumed: everything but bookkeeping that cannot change the maths
    (the step budget may grow, so a finished run can be extended). The strategy is checked separately, with a
    message naming the world size and ZeRO stage (trainers/loop.Checkpointer)."""
    resolved = to_container(cfg)
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k not in ("steps", "checkpoint_every", "budget")}
    for key in ("force", "logger", "run_id", "study", "output_root", "cache_dir", "strategy"):
        resolved.pop(key, None)
    return stable_hash(resolved)


def build_run_stages(cfg: RunConfig) -> list:
    """Build (or find in the cache) every shared stage the run `cfg` needs, without training: what a study's
    stages phase runs before its sweep points, so array jobs find them ready."""
    from rlhf_lab.recipes.dpo import prepare_data
    from rlhf_lab.models.build import allow_remote_code
    from rlhf_lab.recipes.ppo import ppo_stages, sampling_stages

    allow_remote_code(cfg.model.trust_remote_code)
    if isinstance(cfg.algo, PPOConfig):
        return ppo_stages(cfg)[3]
    if isinstance(cfg.algo, BestOfNConfig):
        return sampling_stages(cfg, learned_reward=cfg.algo.scorer == "reward_model")[3]
    if isinstance(cfg.algo, (CriticFreeConfig, OnlineDPOConfig)):
        return sampling_stages(cfg, learned_reward=learns_reward_model(cfg.algo))[3]
    return prepare_data(cfg, resolve_device(cfg.train.device)).stages


def run_alignment(cfg: RunConfig, run_dir: Path) -> dict:
    """Train and evaluate one sweep point; skip it if its run directory is already complete (unless forced).

    A run with a checkpoint in its directory resumes from it (every trainer checkpoints). Rank 0 holds a lock on
    the directory, so two jobs given the same point (a requeued array task racing its first attempt) never write
    into it at once; `rlhf-lab status` reads the lock to tell running from interrupted."""
    from rlhf_lab.models.build import allow_remote_code   # transformers: not for `rlhf-lab status`, which reads RUN_LOCK

    comm.init_process_group(resolve_device(cfg.train.device).type)
    allow_remote_code(cfg.model.trust_remote_code)
    run_dir = Path(comm.broadcast_object(str(run_dir)))  # Hydra may time-stamp each rank's directory differently
    if comm.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = file_lock(run_dir / RUN_LOCK) if comm.is_main() else contextlib.nullcontext()
    with lock:
        done, problem = comm.broadcast_object(_finished(run_dir, cfg.force) if comm.is_main() else None)
        if problem:
            raise UserError(problem)
        if done:
            log.info("run %s is complete; skipping (force=true to rerun)", run_dir)
            return json.loads((run_dir / "summary.json").read_text())
        with reporting_to(run_dir / PROGRESS_FILE):
            return _run_locked(cfg, run_dir)


def _finished(run_dir: Path, force: bool) -> tuple[bool, str | None]:
    """(finished, problem). A finished run is reused only while its files match the manifest written when it
    finished; a damaged one is refused (its points would enter the study's table), never silently used. A run
    finished by an rlhf_lab that wrote no manifest is reused, with a warning: refusing every finished run of an
    existing study would cost a full rerun for no evidence of damage."""
    if force or not is_complete(run_dir):
        return False, None
    if is_legacy(run_dir):
        log.warning("run %s finished before manifests existed: reused without verifying its files", run_dir)
        return True, None
    problem = damage(run_dir)
    if problem is not None:
        return False, (f"run {run_dir} finished but has been damaged since: {problem}. Rerun it with force=true "
                       "(or delete the directory)")
    return True, None


def _run_locked(cfg: RunConfig, run_dir: Path) -> dict:
    from rlhf_lab.recipes.best_of_n import train_best_of_n
    from rlhf_lab.recipes.dpo import train_dpo
    from rlhf_lab.recipes.on_policy import train_critic_free, train_online_dpo
    from rlhf_lab.recipes.ppo import train_ppo

    resume_step = None
    if comm.is_main():
        (run_dir / "error.txt").unlink(missing_ok=True)
        resume_step = _prepare_run_dir(run_dir, resumable=not cfg.force)
    resume_step = comm.broadcast_object(resume_step)
    started = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    resolved = to_container(cfg)
    git = write_run_info(run_dir, resolved) if comm.is_main() else {"sha": None}
    identity = run_identity(cfg)
    tags = [identity.method, f"loss:{identity.loss_type}", f"seed:{cfg.seed}", f"git:{(git['sha'] or 'none')[:8]}"]
    tags += [f"{name}:{value:g}" for name, value in (("beta", identity.beta), ("kl_coef", identity.kl_coef),
                                                     ("lora_r", identity.lora_r)) if value is not None]
    logger = RunLogger(run_dir, cfg.logger, resolved, name=identity.run_id, group=cfg.study, tags=tags,
                       is_main=comm.is_main())
    points = PointsWriter(run_dir / "points.csv") if comm.is_main() else None
    ctx = RunContext(run_dir, identity, logger, points, resume_key(cfg))
    try:
        recipe = {PPOConfig: train_ppo, BestOfNConfig: train_best_of_n, CriticFreeConfig: train_critic_free,
                  OnlineDPOConfig: train_online_dpo}.get(type(cfg.algo), train_dpo)
        details = recipe(cfg, ctx)
    finally:
        if points is not None:
            points.close()
        logger.close()
    summary = {"run_id": identity.run_id, "method": identity.method, "seconds": time.time() - started,
               "resumed_from_step": resume_step, "world_size": comm.world_size(),
               "strategy": to_container(cfg)["strategy"], **peak_memory(), **details}
    if comm.is_main():
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        mark_complete(run_dir)
    comm.barrier()
    return summary


def peak_memory() -> dict:
    """Peak resident memory (and peak GPU allocation on CUDA) of every rank, and the largest."""
    rss, gpu = comm.all_gather_object(peak_rss_mib()), comm.all_gather_object(peak_gpu_mib())
    out = {"peak_rss_mib": max(rss), "peak_rss_mib_per_rank": rss}
    if gpu[0] is not None:
        out.update({"peak_gpu_mib": max(gpu), "peak_gpu_mib_per_rank": gpu})
    return out


def peak_gpu_mib() -> float | None:
    """Peak memory torch allocated on this process's GPU (None on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _prepare_run_dir(run_dir: Path, resumable: bool) -> int | None:
    """Make an incomplete run directory safe to (re)start in; return the step a resumable run continues from.

    Without a checkpoint (or when forced) the previous attempt's points and metrics are removed so nothing is
    double-counted; with one, rows logged after the checkpoint's step are dropped (they are recomputed).
    """
    from rlhf_lab.trainers.checkpoint import latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resumable else None
    if checkpoint is None:
        for name in ("points.csv", "metrics.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
        for name in ("checkpoints", "samples"):
            if (run_dir / name).exists():
                shutil.rmtree(run_dir / name)
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
