"""A study survives random kills: the smoke study is SIGKILLed (the whole process group at once, as a node failure
or `scancel --signal=KILL` does) at seeded random moments in each phase — a stage build, training, an
evaluation, judging, aggregation — and rerun after each kill. After every kill `rlhf-lab status` must tell the
truth, every published stage must be whole and never be published again, and the final points table must equal
the uninterrupted smoke study's (conftest `smoke_study_dir`: same settings, same `jobs`, so CPU runs are
bit-for-bit deterministic)."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from rlhf_lab.eval.points import MACHINE_COLUMNS
from rlhf_lab.study.status import format_status
from rlhf_lab.trainers.checkpoint import latest_checkpoint
from rlhf_lab.utils.cache import COMPLETE_MARKER, damage, is_complete
from tests.cli import CONSOLE, cli_env, run_cli

pytestmark = pytest.mark.integration

# (phase, a line the study prints when it is in that phase); the kill comes a seeded random delay after the line
KILL_PLAN = [
    ("stage build", r"building stage sft "),
    ("training", r"progress: \S+-seed0 training [1-9]"),
    ("evaluation", r"progress: evaluation at step [1-9]"),
    ("judging", r"progress: judging \d"),
    ("aggregation", r"judged \d+ runs"),
]
MAX_DELAY_S = 1.0
ATTEMPT_TIMEOUT_S = 300


def run_until_killed(args: list[str], cwd: Path, pattern: str, delay: float) -> tuple[int, str]:
    """Start the study in its own process group; `delay` seconds after a line matches `pattern`, SIGKILL the
    group (the study and its workers). Returns the exit code (−9 when killed) and the output."""
    env = {**cli_env(), "RLHF_LAB_PROGRESS_SECONDS": "0"}   # a progress line on every step, batch and run
    proc = subprocess.Popen([str(CONSOLE), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.time() + ATTEMPT_TIMEOUT_S
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.time() < deadline, f"no {pattern!r} after {ATTEMPT_TIMEOUT_S} s"
        lines += proc.stdout.readlines()
        return proc.wait(timeout=60), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def published_stages(cache: Path) -> dict[Path, int]:
    """Every published stage directory and its marker's mtime; each must be whole."""
    found = {}
    for marker in cache.rglob(COMPLETE_MARKER):
        stage_dir = marker.parent
        if any(part.startswith(".") for part in stage_dir.relative_to(cache).parts):
            continue   # stage checkpoints and leftovers of killed builds: hidden, never taken for a stage
        assert damage(stage_dir) is None, f"{stage_dir} is published but damaged: {damage(stage_dir)}"
        found[stage_dir] = marker.stat().st_mtime_ns
    return found


def check_status_tells_the_truth(root: Path, run_ids: list[str], command: bool = False) -> None:
    """Nothing runs after a kill: every run is done (its directory complete), interrupted (resuming from its
    newest checkpoint) or missing, exactly as on disk, and 'not finished' until all are done. `command`: through
    `rlhf-lab status` (its exit code too); otherwise its report function in-process (the same text, without the
    command's seconds of start-up after each of the five kills)."""
    if command:
        out = run_cli(["status", "study=smoke", f"output_root={root}"], root, check=False)
        text, not_done = out.stdout, out.returncode
    else:
        text, not_done = format_status("smoke", root / "smoke", root / "cache", run_ids)
    states = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in run_ids:
            states[fields[1]] = (fields[0], line)
    runs = root / "smoke" / "runs"
    for run_id in run_ids:
        state, line = states[run_id]
        run_dir = runs / run_id
        if is_complete(run_dir):
            assert state == "done", line
        elif run_dir.exists():
            checkpoint = latest_checkpoint(run_dir / "checkpoints")
            assert state == "interrupted", line
            assert (f"resumes from {checkpoint.name}" if checkpoint else "restarts") in line, line
        else:
            assert state == "missing", line
    assert "running" not in text, text
    all_done = all(is_complete(runs / r) for r in run_ids)
    assert bool(not_done) == (not all_done), text


def test_study_survives_sigkill_in_every_phase(tmp_path, smoke_study_dir):
    root, rng = tmp_path, random.Random(13)
    # a checkpoint every step, so each kill interrupts work that must resume, not restart (resuming is exact,
    # and the checkpoint interval is not part of a run's identity: the points must still equal the smoke study's)
    args = ["study", "study=smoke", "jobs=2", f"output_root={root}", "train.checkpoint_every=1"]
    run_ids = run_cli(["study", "study=smoke", "phase=list"], root).stdout.split()
    seen: dict[Path, int] = {}
    for phase, pattern in KILL_PLAN:
        delay = rng.uniform(0, MAX_DELAY_S)
        code, output = run_until_killed(args, root, pattern, delay)
        assert code == -signal.SIGKILL, f"the {phase} kill came too late: the study ended ({code})\n{output[-3000:]}"
        stages = published_stages(root / "cache")
        for stage_dir, mtime in seen.items():   # published once: never rebuilt, never replaced
            assert stages.get(stage_dir) == mtime, f"{stage_dir} was published again after the {phase} kill"
        seen = stages
        check_status_tells_the_truth(root, run_ids)

    final = run_cli(args, root)
    assert "FAILED" not in final.stdout
    assert published_stages(root / "cache") == seen            # the rerun published nothing new
    check_status_tells_the_truth(root, run_ids, command=True)
    expected, got = (pd.read_csv(d / "points.csv").drop(columns=list(MACHINE_COLUMNS))
                     .sort_values(["run_id", "step"], ignore_index=True) for d in (smoke_study_dir, root / "smoke"))
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
