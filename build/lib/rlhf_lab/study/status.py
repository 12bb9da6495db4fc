"""`rlhf-lab status study=NAME`: which shared stages and which runs of a study are done, running, failed or missing.

Read-only and safe while the study runs: "running" means a process holds the stage's or run's lock right now,
so a run killed without a trace (SIGKILL, node failure) shows as "interrupted", not as running forever.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_lab.study import record
from rlhf_lab.study.points import STUDY_PROGRESS
from rlhf_lab.utils.cache import damage, is_complete
from rlhf_lab.utils.lock import is_locked
from rlhf_lab.utils.progress import describe, read_snapshot

ERROR_TAIL_LINES = 4


@dataclass
class RunStatus:
    run_id: str
    state: str          # done | running | failed | interrupted | missing | damaged
    detail: str = ""    # seconds, checkpoint step, or the error's last lines


def run_status(run_dir: Path) -> RunStatus:
    from rlhf_lab.recipes.run import PROGRESS_FILE, RUN_LOCK
    from rlhf_lab.trainers.checkpoint import latest_checkpoint

    run_id = run_dir.name
    if is_complete(run_dir):
        problem = damage(run_dir)
        return RunStatus(run_id, "damaged", f"{problem}; rerun with force=true") if problem else RunStatus(run_id, "done")
    if is_locked(run_dir / RUN_LOCK):
        return RunStatus(run_id, "running", progress_note(run_dir / PROGRESS_FILE))
    if (run_dir / "error.txt").exists():
        tail = (run_dir / "error.txt").read_text().strip().splitlines()[-ERROR_TAIL_LINES:]
        return RunStatus(run_id, "failed", "\n".join(tail))
    if run_dir.exists():
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        return RunStatus(run_id, "interrupted", f"resumes from {checkpoint.name}" if checkpoint else "restarts")
    return RunStatus(run_id, "missing")


def stage_states(study_dir: Path, cache_dir: Path) -> list[tuple[str, str, str]]:
    """(stage, key, state) for the stages the study recorded, plus any stage build holding a lock right now."""
    rows = []
    for entry in record.read_json(study_dir / record.STAGES_RECORD).values():
        stage_dir = Path(entry["dir"])
        problem = damage(stage_dir) if is_complete(stage_dir) else None
        state = ("missing (deleted from the cache?)" if not is_complete(stage_dir) else
                 f"damaged ({problem}): rebuilt when next used" if problem else "done")
        if "build_seconds" in entry:
            state += f", built in {entry['build_seconds']:.0f} s"
        rows.append((entry["stage"], entry["key"], state))
    for lock in sorted(Path(cache_dir).glob("*/.*.lock")):
        if is_locked(lock):
            key = lock.name[1:-len(".lock")]
            note = progress_note(lock.with_name(f".{key}.progress.json"))
            rows.append((lock.parent.name, key, "running (being built now)" + (f": {note}" if note else "")))
    return rows


def progress_note(path: Path) -> str:
    """'ppo training 30/100 steps (30%), 2.1 steps/s, ETA 0:00:33 (updated 4 s ago)' from a snapshot, or ''."""
    snapshot = read_snapshot(path)
    if snapshot is None:
        return ""
    return f"{describe(snapshot)} (updated {max(0.0, time.time() - snapshot['updated']):.0f} s ago)"


def format_status(study: str, study_dir: Path, cache_dir: Path, run_ids: list[str]) -> tuple[str, int]:
    """The report text, and how many runs are not done."""
    lines = [f"study {study}: {study_dir}", "", "stages:"]
    stages = stage_states(study_dir, cache_dir)
    lines += [f"  {name:<16} {key:<14} {state}" for name, key, state in stages] or ["  none built yet"]
    statuses = [run_status(study_dir / "runs" / run_id) for run_id in run_ids]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines += ["", "runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))]
    for s in statuses:
        first, *rest = (s.detail or "").splitlines() or [""]
        lines.append(f"  {s.state:<12} {s.run_id:<32} {first}")
        lines += [f"  {'':<12} {'':<32} {line}" for line in rest]
    study_progress = read_snapshot(study_dir / STUDY_PROGRESS)
    if study_progress and study_progress["done"] < study_progress["total"] and any(
            s.state == "running" for s in statuses):
        lines += ["", "progress: " + progress_note(study_dir / STUDY_PROGRESS)]
    record_path = study_dir / record.STUDY_RECORD
    if record_path.exists():
        phases = record.read_json(record_path).get("phase_seconds", {})
        if phases:
            lines += ["", "last phase wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())]
    return "\n".join(lines), sum(s.state != "done" for s in statuses)


def status_main(args: list[str]) -> int:
    """Exit 0 when every run is done, 1 otherwise (scriptable: `until rlhf-lab status ...; do sleep 60; done`)."""
    from rlhf_lab.study.runner import compose_run_config, load_study, parse_study_args, study_dir_of, sweep_points

    opts = parse_study_args(args)
    spec = load_study(opts.name)
    points = sweep_points(spec, opts.overrides)
    cfg = compose_run_config(points[0].overrides)
    text, not_done = format_status(spec["name"], study_dir_of(cfg, spec), Path(cfg.cache_dir),
                                   [p.run_id for p in points])
    print(text)
    return 1 if not_done else 0
