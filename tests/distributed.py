"""Launching the real CLI (or a test script) on N processes with torchrun, as users do, each call in its own
process group with a timeout: a hang fails the test instead of stalling the suite."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from rlhf_lab.eval.points import MACHINE_COLUMNS
from tests.cli import REPO, cli_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args: list[str], nproc: int, module: str = "rlhf_lab.cli") -> list[str]:
    launch = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    target = ["-m", module] if not module.endswith(".py") else [module]
    return [*launch, *target, *args]


def run_torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300, check: bool = True,
                 module: str = "rlhf_lab.cli") -> subprocess.CompletedProcess:
    """Run to completion; on timeout the whole process group is killed and the test fails."""
    proc = subprocess.Popen(torchrun_command(args, nproc, module), cwd=cwd, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} hung for {timeout} s:\n{out[-1500:]}\n{err[-3000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n{out[-1500:]}\n{err[-4000:]}")
    return done


def kill_after_checkpoint(args: list[str], cwd: Path, step: int, nproc: int = 2, timeout: int = 300) -> None:
    """Run until the checkpoint of `step` is published, then SIGKILL rank 0 there (a preemption at a known
    moment, injected by RLHF_LAB_KILL_AFTER_CHECKPOINT); torchrun tears down the other ranks."""
    env = {**cli_env(), "RLHF_LAB_KILL_AFTER_CHECKPOINT": str(step)}
    proc = subprocess.run(torchrun_command(args, nproc), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    assert proc.returncode != 0, "the run was not killed"
    assert "Signals.SIGKILL" in proc.stderr or "-9" in proc.stderr, proc.stderr[-2000:]


def train_metrics(run_dir: Path, volatile: tuple[str, ...] = ("per_s", *MACHINE_COLUMNS)) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(s in k for s in volatile)} for r in rows]


def assert_metrics_close(got: list[dict], want: list[dict], rtol: float, atol: float,
                         loose: dict[str, float] | None = None) -> None:
    """Same steps, same keys, every number within tolerance (`loose`: a wider rtol for named keys)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g.keys() ^ w.keys())
        for key, expected in w.items():
            value = g[key]
            if not isinstance(expected, (int, float)) or isinstance(expected, bool):
                assert value == expected, (g["step"], key, value, expected)
                continue
            tol = (loose or {}).get(key, rtol)
            assert abs(value - expected) <= atol + tol * abs(expected), (g["step"], key, value, expected)


__all__ = ["REPO", "assert_metrics_close", "kill_after_checkpoint", "run_torchrun", "smoke_study_file", "train_metrics"]


def smoke_study_file(tmp: Path, name: str, arms: dict[str, dict], **extra) -> Path:
    """The smoke study's tiny overrides with the given arms (and extra top-level keys such as resources)."""
    import yaml

    spec = yaml.safe_load((REPO / "conf" / "studies" / "smoke.yaml").read_text())
    spec.pop("judges", None)
    spec.update({"name": name, "arms": arms, **extra})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
