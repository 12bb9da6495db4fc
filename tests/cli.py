"""Running the installed `rlhf-lab` console script from tests, exactly as users call it (it resolves its configs
differently from `python -m`), offline, with the repository importable (for `module:function` rewards)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CONSOLE = Path(sys.executable).with_name("rlhf-lab")
REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_cli(args: list[str], cwd: Path, check: bool = True, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`rlhf-lab <args>` in `cwd`; with `check`, a non-zero exit fails the test with the output's tail."""
    out = subprocess.run([str(CONSOLE), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env or cli_env())
    if check and out.returncode != 0:
        raise AssertionError(f"rlhf-lab {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


def kill_after_checkpoint(args: list[str], cwd: Path, run_dir: Path, step: int, timeout: int = 300) -> None:
    """Start `rlhf-lab <args>`, SIGKILL it as soon as its step-`step` checkpoint is complete, and check the run
    directory was not published (a killed run must never look finished)."""
    proc = subprocess.Popen([str(CONSOLE), *args], cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"step-{step:06d}" / "_COMPLETE").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "_COMPLETE").exists()
