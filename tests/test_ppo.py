"""PPO end to end on tiny models through the console script: both reward sources, exact resume after SIGKILL,
SIGTERM checkpoint-and-exit, and non-finite rewards."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rlhf_lab.eval.points import MACHINE_COLUMNS
from tests.cli import CONSOLE, cli_env, kill_after_checkpoint, run_cli
from tests.test_pipeline_smoke import TINY_BASE, comparable_points, read_points, without

pytestmark = pytest.mark.integration

PPO = ["train.steps=4", "eval.every=2", "algo.rollout_batch_size=8", "algo.micro_batch_size=4",
       "algo.num_mini_batches=1", "algo.ppo_epochs=2", "algo.response_length=10", "train.checkpoint_every=1",
       "reward_model.steps=10", "reward_model.normalization_samples=16", "train.save_model=false"]
VOLATILE = ("per_s", *MACHINE_COLUMNS)  # wall-clock and memory figures differ between runs by nature


def ppo_args(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    args = [*TINY_BASE, *PPO, *extra]
    if "algo=ppo_gt" in extra:   # no reward model (its keys would be refused), but a gold normalisation
        args = without(args, "preferences.", "reward_model.steps")
    elif "algo.reward=callable" in extra:
        args = without(args, "preferences.", "reward_model.")
    return [*args, f"output_root={workspace}", f"hydra.run.dir={run_dir}"]


def command(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(CONSOLE), *ppo_args(workspace, run_dir, *extra)]


def run(workspace, run_dir, *extra, check=True):
    return run_cli(ppo_args(workspace, run_dir, *extra), workspace, check)


def train_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(s in k for s in VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("ppo")


@pytest.fixture(scope="module")
def ppo_gt_run(workspace):
    run_dir = workspace / "gt"
    run(workspace, run_dir, "algo=ppo_gt")
    return run_dir


def test_ppo_gt_writes_trl_metrics_and_points(ppo_gt_run):
    rows = read_points(ppo_gt_run / "points.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert rows[0]["method"] == "ppo_gt" and float(rows[0]["kl_coef"]) == 0.05 and rows[0]["beta"] == ""
    metrics = [m for m in train_metrics(ppo_gt_run) if "objective/kl" in m]
    assert len(metrics) == 4
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
                "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var",
                "val/num_eos_tokens", "objective/gold"):
        assert key in metrics[0], key
    m = metrics[0]
    assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"] + m["objective/non_score_reward"])


def test_ppo_with_learned_reward_model(workspace):
    run_dir = workspace / "learned"
    run(workspace, run_dir, "algo=ppo", "train.steps=2")
    rows = read_points(run_dir / "points.csv")
    assert rows[-1]["method"] == "ppo" and rows[-1]["proxy_reward_mean"] != ""
    (rm_dir,) = sorted((workspace / "cache" / "reward_model").glob("[0-9a-f]*"))
    info = json.loads((rm_dir / "rm_info.json").read_text())
    assert "eval_accuracy" in json.dumps(info)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peak_rss_mib"] > 0


def test_best_of_n_by_the_learned_reward_model(workspace):
    """algo.scorer=reward_model on the stages the test above built: the learned RM picks, so its score (the
    proxy column) of the selected sample cannot fall as n grows, while gold may (over-optimisation)."""
    run_dir = workspace / "bon_rm"
    args = [*without(TINY_BASE, "train.", "eval.every"), "algo=best_of_n", "algo.samples=4",
            "algo.scorer=reward_model", "reward_model.steps=10", "reward_model.normalization_samples=16",
            f"output_root={workspace}", f"hydra.run.dir={run_dir}"]
    run_cli(args, workspace)
    rows = read_points(run_dir / "points.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4] and {r["loss_type"] for r in rows} == {"reward_model"}
    proxy = [float(r["proxy_reward_mean"]) for r in rows]
    assert all(a <= b + 1e-9 for a, b in zip(proxy, proxy[1:])) and proxy[-1] > proxy[0]


def test_sigkill_then_resume_reproduces_uninterrupted_run(workspace, ppo_gt_run):
    run_dir = workspace / "killed"
    kill_after_checkpoint(ppo_args(workspace, run_dir, "algo=ppo_gt"), workspace, run_dir, 2)
    out = run(workspace, run_dir, "algo=ppo_gt")
    assert "resumed from" in out.stderr + out.stdout
    assert train_metrics(run_dir) == train_metrics(ppo_gt_run)
    assert comparable_points(run_dir / "points.csv") == comparable_points(ppo_gt_run / "points.csv")


def test_sigterm_checkpoints_and_exits_cleanly(workspace):
    run_dir = workspace / "term"
    proc = subprocess.Popen(command(workspace, run_dir, "algo=ppo_gt", "train.steps=50", "train.checkpoint_every=100"),
                            cwd=workspace, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or '"objective/kl"' not in (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpointed at step" in out + err
    assert list((run_dir / "checkpoints").glob("step-*/_COMPLETE"))
    assert not (run_dir / "_COMPLETE").exists()
    # resuming that checkpoint under a different configuration is refused, not silently mixed
    changed = run(workspace, run_dir, "algo=ppo_gt", "train.steps=50", "train.checkpoint_every=100",
                  "algo.actor_lr=0.001", check=False)
    assert changed.returncode == 2
    assert "different configuration" in changed.stdout + changed.stderr


def test_nonfinite_rewards_are_counted_and_excluded(workspace):
    run_dir = workspace / "somenan"
    run(workspace, run_dir, "algo=ppo", "algo.reward=callable", "algo.critic_init=sft",
        "algo.reward_callable=tests.ppo_rewards:some_nan_reward", "train.steps=1", "eval.every=1")
    metrics = [m for m in train_metrics(run_dir) if "objective/kl" in m]
    assert metrics[0]["reward/nonfinite_episodes"] == 2  # rows 0 and 4 of 8
    assert metrics[0]["objective/scores"] == pytest.approx(1.0)


def test_reward_with_no_finite_score_stops_with_a_message(workspace):
    out = run(workspace, workspace / "allnan", "algo=ppo", "algo.reward=callable", "algo.critic_init=sft",
              "algo.reward_callable=tests.ppo_rewards:all_nan_reward", check=False)
    assert out.returncode == 3
    assert "no finite score" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
