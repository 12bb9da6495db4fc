"""The point phase of a study: run sweep points in this process, in a pool of processes (`jobs` at a time), or
as several ranks each (the study's `resources`) under torchrun — what one srun task per rank does on SLURM."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from rlhf_lab.config import RunConfig, SamplingConfig
from rlhf_lab.distributed import comm
from rlhf_lab.study import record
from rlhf_lab.trainers.errors import PreemptedError
from rlhf_lab.utils.cache import atomic_write_text
from rlhf_lab.utils.progress import MODE_ENV, Progress, reporting_to

log = logging.getLogger(__name__)
STUDY_PROGRESS = "progress.json"    # <study_dir>/progress.json: runs done / total, rate, ETA (rlhf-lab status)


@dataclass
class SweepPoint:
    arm: str
    run_id: str
    overrides: list[str]
    index: int = 0               # position in the study's point list (= SLURM array task id)


def run_point(point: SweepPoint, study_dir: Path, cfg: RunConfig | None = None) -> float:
    """Train and evaluate one sweep point into `<study>/runs/<run_id>`; a failure is written to error.txt and
    re-raised. Returns the run's wall time."""
    from rlhf_lab.recipes.run import run_alignment

    from rlhf_lab.study.runner import compose_run_config

    cfg = cfg or compose_run_config(point.overrides)
    run_dir = study_dir / "runs" / point.run_id
    started = time.time()
    try:
        summary = run_alignment(cfg, run_dir)
    except PreemptedError:  # the job was asked to stop: the run checkpointed; nothing failed
        raise
    except Exception:
        if comm.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "error.txt", traceback.format_exc())
        raise
    seconds = float(summary.get("seconds", time.time() - started))
    if comm.is_main():
        record.record_study(study_dir, run_seconds={point.run_id: round(seconds, 1)})
    return seconds


@dataclass
class PointLauncher:
    """How the local runner starts a sweep point: in this process, or — when the study's resources ask for more
    than one process — as that many ranks under torchrun, each running `rlhf-lab study ... phase=point index=I`
    (what each srun task runs on SLURM)."""

    study: str                       # the study name or path as the user gave it
    overrides: tuple[str, ...]       # command-line overrides applied to every run
    processes: int = 1
    threads: int = 1                 # torch threads per process

    def run(self, point: SweepPoint, study_dir: Path, cfg: RunConfig | None = None) -> float:
        if self.processes == 1 or comm.world_size() > 1:
            return run_point(point, study_dir, cfg)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(self.processes), "-m", "rlhf_lab.cli", "study", f"study={self.study}", "phase=point",
                   f"index={point.index}", *self.overrides]
        started = time.time()
        code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(self.threads)}).returncode
        if code != 0:
            raise RuntimeError(f"point {point.run_id} on {self.processes} processes exited with code {code} "
                               f"(details in {study_dir / 'runs' / point.run_id / 'error.txt'})")
        return time.time() - started


def _point_in_worker(point: SweepPoint, study_dir: Path, launcher: PointLauncher) -> tuple[str, str | None]:
    """Process-pool entry: one point with the launcher's torch threads; returns (run_id, error or None)."""
    import torch

    from rlhf_lab.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(launcher.threads)
    _log_lines_as(point.run_id)
    try:
        launcher.run(point, study_dir)
        return point.run_id, None
    except PreemptedError as e:  # asked to stop: the run checkpointed and resumes on the next study run
        return point.run_id, f"stopped: {e}"
    except Exception as e:  # noqa: BLE001 — reported by the parent, details in error.txt
        return point.run_id, f"{type(e).__name__}: {e}"


def _log_lines_as(run_id: str) -> None:
    """Prefix this worker's log lines with the point it runs now (a worker runs several points in turn)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[%(asctime)s {run_id}] %(message)s", datefmt="%H:%M:%S"))


def _init_worker() -> None:
    """Pool initializer: on Linux a worker gets SIGTERM when the study process dies (killed, job cancelled), instead
    of training on as an orphan (its run then checkpoints and stops); several workers share one terminal, so they
    report progress as lines, not as bars that would overwrite each other."""
    import ctypes
    import signal
    import sys

    if os.environ.get(MODE_ENV) != "off":
        os.environ[MODE_ENV] = "lines"

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_points(points: list[SweepPoint], configs: list[RunConfig], study_dir: Path, jobs: int,
               launcher: PointLauncher) -> list[str]:
    """Every sweep point, `jobs` at a time (separate processes splitting the cores); returns the failed run ids."""
    started, failures = time.time(), []
    launcher.threads = max(1, (os.cpu_count() or 1) // (jobs * launcher.processes))
    with reporting_to(study_dir / STUDY_PROGRESS), Progress("study runs", len(points), "run") as progress:
        if jobs == 1:
            for point, cfg in zip(points, configs):
                log.info("=== %s", point.run_id)
                try:
                    launcher.run(point, study_dir, cfg)
                except PreemptedError:
                    raise
                except Exception as e:  # one failed point must not stop the others
                    failures.append(point.run_id)
                    log.error("run %s failed: %s (details in %s)", point.run_id, e,
                              study_dir / "runs" / point.run_id / "error.txt")
                progress.advance()
        else:
            # longest first (PPO's four models cost more per step than DPO's two): a shorter tail when jobs > 1
            longest_first = sorted(zip(points, configs), key=lambda pc: not isinstance(pc[1].algo, SamplingConfig))
            failures = _run_pool([p for p, _ in longest_first], study_dir, jobs, launcher, progress)
    record.record_study(study_dir, phase_seconds={"runs": round(time.time() - started, 1)})
    return failures


def _run_pool(points: list[SweepPoint], study_dir: Path, jobs: int, launcher: PointLauncher,
              progress: Progress) -> list[str]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    log.info("running %d points, %d at a time with %d process(es) of %d torch thread(s) each", len(points), jobs,
             launcher.processes, launcher.threads)
    failures = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(_point_in_worker, p, study_dir, launcher): p for p in points}
        for future in as_completed(futures):
            point = futures[future]
            try:
                run_id, error = future.result()
            except BrokenProcessPool as e:  # a worker was killed (e.g. out of memory): the point failed
                run_id, error = point.run_id, f"worker process died: {e}"
            if error:
                failures.append(run_id)
                log.error("run %s failed: %s", run_id, error)
            else:
                log.info("run %s done", run_id)
            progress.advance()
    return failures
