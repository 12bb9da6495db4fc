"""SFT and reward-model stage builds that are SIGKILLed resume from their own checkpoints and publish exactly the
model an uninterrupted build publishes (one process, CPU: bit-identical)."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
from safetensors.torch import load_file

from tests.cli import CONSOLE, cli_env, run_cli
from tests.test_pipeline_smoke import TINY_BASE

pytestmark = pytest.mark.integration

PPO = [*TINY_BASE, "algo=ppo", "train.steps=1", "eval.every=1", "algo.rollout_batch_size=8", "algo.micro_batch_size=4",
       "algo.response_length=8", "reward_model.steps=10", "reward_model.normalization_samples=16",
       "train.save_model=false", "train.checkpoint_every=5"]


def killed_at(workspace, cache: str, where: str) -> None:
    out = subprocess.run([str(CONSOLE), *PPO, f"output_root={workspace}", f"cache_dir={workspace / cache}",
                          f"hydra.run.dir={workspace / ('run-' + cache)}"], cwd=workspace, capture_output=True,
                         text=True, timeout=300, env={**cli_env(), "RLHF_LAB_KILL_AFTER_CHECKPOINT": where})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]


@pytest.mark.slow   # ~1 min: kept out of the 20-minute CI budget; `make test TEST_ARGS="-m slow"`
def test_killed_sft_and_reward_model_builds_resume_to_the_same_models(tmp_path):
    killed_at(tmp_path, "resumed", "sft:10")                    # SFT killed after its step-10 checkpoint
    (sft_checkpoints,) = (tmp_path / "resumed" / "sft").glob(".*.checkpoints")
    assert (sft_checkpoints / "step-000010" / "_COMPLETE").exists()
    assert not [p for p in (tmp_path / "resumed" / "sft").iterdir() if not p.name.startswith(".")]
    killed_at(tmp_path, "resumed", "reward_model:5")            # SFT resumes and publishes; the RM is killed
    out = run_cli([*PPO, f"output_root={tmp_path}", f"cache_dir={tmp_path / 'resumed'}",
                   f"hydra.run.dir={tmp_path / 'run-resumed'}"], tmp_path)
    assert out.stdout.count("resumed from") + out.stderr.count("resumed from") >= 1
    run_cli([*PPO, f"output_root={tmp_path}", f"cache_dir={tmp_path / 'straight'}",
             f"hydra.run.dir={tmp_path / 'run-straight'}"], tmp_path)
    for stage in ("sft", "reward_model"):
        (a,) = (tmp_path / "straight" / stage).glob("*/model.safetensors")
        (b,) = (tmp_path / "resumed" / stage).glob("*/model.safetensors")
        assert a.parent.name == b.parent.name
        straight, resumed = load_file(a), load_file(b)
        assert all(bool((straight[k] == resumed[k]).all()) for k in straight), stage
        assert not list((tmp_path / "resumed" / stage).glob(".*.checkpoints")), "checkpoints kept after publishing"
    assert os.path.exists(tmp_path / "run-resumed" / "_COMPLETE")
