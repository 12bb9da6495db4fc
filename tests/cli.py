"""Running the installed `rlhf-lab` console script from tests, exactly as users call it (it resolves its configs
differently from `python -m`), offline, with the repository importable (for `module:function` rewards)."""
from __future__ import annotations

import os
import subprocess
import sys
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
