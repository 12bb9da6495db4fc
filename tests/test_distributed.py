"""Data parallelism and DeepSpeed ZeRO on 2 CPU processes (gloo), through the real CLI under torchrun.

Each case runs in its own process group with a timeout. What is asserted:
  * DPO on 2 ranks (DDP, ZeRO-2, ZeRO-3) equals one process on the same global batches, step by step;
  * PPO with actor/critic ZeRO-3 engines and reference/reward ZeRO-3 eval engines with parameter offload runs
    (ranks' completions end at different lengths) and matches DDP with the same sharding;
  * SFT and the reward model trained on 2 processes equal the 1-process models;
  * SIGKILL and resume under ZeRO-3 reproduce the uninterrupted run (DPO and PPO); a resume at another world
    size is refused with a message.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_lab.eval.points import MACHINE_COLUMNS
from tests.cli import run_cli
from tests.distributed import (assert_metrics_close, kill_after_checkpoint, run_torchrun, smoke_study_file,
                               train_metrics)
from tests.test_pipeline_smoke import DPO_BATCH, TINY_BASE

pytestmark = pytest.mark.integration

CPU = [*TINY_BASE, "train.device=cpu"]
PPO = ["algo=ppo", "train.steps=2", "eval.every=1", "algo.rollout_batch_size=8", "algo.micro_batch_size=2",
       "algo.num_mini_batches=2", "algo.ppo_epochs=2", "algo.response_length=10", "reward_model.steps=10",
       "reward_model.batch_size=8", "reward_model.normalization_samples=16", "train.save_model=false"]
# reduction order differs between one process and two, and between DDP and ZeRO: differences stay at float32
# rounding; the pre-clip gradient norm and tiny KLs carry a little more (sums of many small terms)
RTOL, ATOL = 1e-5, 1e-6
LOOSE = {"train/grad_norm": 1e-4, "eval/kl_mean": 1e-3, "eval/kl_se": 1e-3, "eval/kl_sampled_mean": 1e-2,
         "eval/kl_sampled_se": 1e-2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def args(workspace: Path, run: str, *extra: str, cache: str = "cache") -> list[str]:
    batch = [] if "algo=ppo" in extra else DPO_BATCH   # PPO refuses the DPO family's batch keys
    return [*CPU, *batch, *extra, f"output_root={workspace}", f"cache_dir={workspace / cache}",
            f"hydra.run.dir={workspace / run}"]


def read_points(path: Path) -> list[dict]:
    """The rows as numbers, without the columns that depend on the machine (wall seconds, peak memory)."""
    with open(path) as f:
        return [{k: (float(v) if k not in ("study", "run_id", "method", "loss_type") and v else v)
                 for k, v in row.items() if k not in MACHINE_COLUMNS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def dpo_single(workspace):
    """One process, accumulation 2: the reference the 2-rank runs (accumulation 1 each) must equal."""
    run_cli(args(workspace, "dpo1", "train.steps=4"), workspace)
    return workspace / "dpo1"


# ZeRO-2 runs with the slow tests (CI budget): ZeRO-3 partitions everything ZeRO-2 does, and more
@pytest.mark.parametrize("strategy", ["torch", pytest.param("zero2", marks=pytest.mark.slow), "zero3"])
def test_dpo_on_two_ranks_equals_one_process(workspace, dpo_single, strategy):
    run_dir = workspace / f"dpo2-{strategy}"
    run_torchrun(args(workspace, run_dir.name, "train.steps=4", f"strategy={strategy}"), workspace)
    assert_metrics_close(train_metrics(run_dir), train_metrics(dpo_single), RTOL, ATOL, LOOSE)
    assert_metrics_close(read_points(run_dir / "points.csv"), read_points(dpo_single / "points.csv"), RTOL, ATOL,
                         {k.split("/")[1]: v for k, v in LOOSE.items()})
    assert not (workspace / ".hydra").exists()  # the second rank writes no Hydra directory of its own
    if strategy == "zero3":  # the HF export gathered from ZeRO-3 partitions loads as the trained model
        from transformers import AutoModelForCausalLM

        one = AutoModelForCausalLM.from_pretrained(dpo_single / "model").state_dict()
        two = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
        for name, tensor in one.items():
            torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def stages_two_ranks(workspace):
    """SFT, preferences and reward model built by a 2-rank DDP PPO run into a fresh cache."""
    run_torchrun(args(workspace, "ppo-ddp", *PPO, cache="cache2"), workspace)
    return workspace / "cache2"


@pytest.mark.slow   # the CI budget: DPO and PPO on two ranks stay in the default suite
def test_sft_and_reward_model_on_two_ranks_equal_one_process(workspace, stages_two_ranks):
    run_cli(args(workspace, "ppo-one", *PPO, cache="cache1"), workspace)
    weights = {}
    for stage in ("sft", "reward_model"):
        (one,) = (workspace / "cache1" / stage).glob("*/model.safetensors")
        (two,) = (stages_two_ranks / stage).glob("*/model.safetensors")
        assert one.parent.name == two.parent.name  # same stage key: the world size is not part of it
        weights[stage] = load_file(one), load_file(two)
    for name, tensor in weights["sft"][0].items():
        torch.testing.assert_close(weights["sft"][1][name], tensor, rtol=1e-4, atol=1e-5, msg=f"sft {name}")
    # AdamW moves each coordinate by about lr per step whatever the gradient's size, so a coordinate whose
    # gradient is ~0 may step either way under another reduction order: the RM's weights agree to steps × lr
    # (10 × 1e-4), its training and held-out metrics to float rounding
    one, two = weights["reward_model"]
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-3, msg=f"reward_model {name}")
    info = [json.loads(next((workspace / c / "reward_model").glob("*/rm_info.json")).read_text())
            for c in ("cache1", "cache2")]
    for key in ("train_loss", "eval_loss", "train_accuracy", "eval_accuracy", "initial_eval_loss"):
        assert info[1][key] == pytest.approx(info[0][key], rel=1e-5), key
    assert (info[0]["world_size"], info[1]["world_size"]) == (1, 2)


# synced: the loop for models too large to gather, where ranks finishing at different lengths could hang. The gathered
# path is what every ZeRO-3 DPO evaluation above takes too, so its PPO case runs with the slow tests (CI budget)
@pytest.mark.parametrize("generation", [pytest.param("gather", marks=pytest.mark.slow), "synced"])
def test_ppo_zero3_with_offloaded_eval_engines_matches_ddp(workspace, stages_two_ranks, generation):
    """gather: the actor's parameters gathered once per rollout; synced: collective forwards, the ranks stepping
    until every rank's samples have ended (they end at different lengths on different ranks)."""
    run = f"ppo-z3-{generation}"
    run_torchrun(args(workspace, run, *PPO, "strategy=zero3", "strategy.reference_offload_param=true", "strategy.reward_offload_param=true",
                      f"strategy.generation={generation}", cache="cache2"), workspace)
    # cost columns left out: synced generation steps every rank until all have finished, so it forwards more tokens
    ddp, zero3 = (train_metrics(workspace / r, volatile=("per_s", "cost/")) for r in ("ppo-ddp", run))
    assert_metrics_close(zero3, ddp, 1e-4, 1e-5, {**LOOSE, "loss/value_avg": 1e-3, "val/ratio_var": 1e-2})
    lengths = [m["val/response_length"] for m in zero3 if "val/response_length" in m]
    assert lengths and all(0 < x <= 10 for x in lengths)


# DPO's case is slow-marked for the CI budget: PPO's covers the same collective checkpoint with more roles
@pytest.mark.parametrize("algo", [pytest.param("dpo", marks=pytest.mark.slow), "ppo"])
def test_sigkill_and_resume_under_zero3(workspace, stages_two_ranks, algo):
    extra = ["strategy=zero3", "train.checkpoint_every=2", "eval.every=100"]   # evaluations at 0 and the end
    extra += [*PPO, "train.steps=3"] if algo == "ppo" else ["train.steps=4"]
    straight = workspace / f"{algo}-z3-straight"
    run_torchrun(args(workspace, straight.name, *extra, cache="cache2"), workspace)
    killed = workspace / f"{algo}-z3-killed"
    kill_after_checkpoint(args(workspace, killed.name, *extra, cache="cache2"), workspace, step=2)
    assert (killed / "checkpoints" / "step-000002" / "_COMPLETE").exists()
    assert not (killed / "_COMPLETE").exists()
    if algo == "dpo":   # the layout check is the trainers' shared Checkpointer: one algorithm shows it
        refused = run_cli(args(workspace, killed.name, *extra, cache="cache2"), workspace, check=False)
        assert refused.returncode == 2 and "2 process(es), ZeRO-3" in refused.stdout + refused.stderr, \
            refused.stderr[-2000:]
    resumed = run_torchrun(args(workspace, killed.name, *extra, cache="cache2"), workspace)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_metrics_close(train_metrics(killed), train_metrics(straight), 0.0, 0.0)
    assert read_points(killed / "points.csv") == read_points(straight / "points.csv")


@pytest.mark.slow   # the same two-process point runs under SLURM in tests/test_slurm.py (srun, two tasks)
def test_study_points_on_two_processes_locally(tmp_path):
    """`resources: {processes: 2}`: the local runner starts each point as 2 ranks under torchrun (each rank runs
    `rlhf-lab study ... phase=point index=I`, as srun tasks do on SLURM); the points table is assembled as usual."""
    study = smoke_study_file(tmp_path, "two_ranks", {
        "dpo": {"overrides": ["algo=dpo"], "sweep": {"algo.beta": [0.1]}},
        "ppo_gt": {"overrides": ["algo=ppo_gt", "algo.rollout_batch_size=8", "algo.micro_batch_size=2",
                               "algo.ppo_epochs=1", "algo.response_length=8"], "sweep": {"algo.kl_coef": [0.05]}},
    }, resources={"processes": 2})
    run_cli(["study", f"study={study}", f"output_root={tmp_path / 'out'}", "train.device=cpu"], tmp_path,
            timeout=600)
    runs = tmp_path / "out" / "two_ranks" / "runs"
    for run in ("dpo-beta0.1-seed0", "ppo_gt-kl_coef0.05-seed0"):
        summary = json.loads((runs / run / "summary.json").read_text())
        assert summary["world_size"] == 2 and (runs / run / "_COMPLETE").exists()
    with open(tmp_path / "out" / "two_ranks" / "points.csv") as f:
        assert {row["run_id"] for row in csv.DictReader(f)} == {"dpo-beta0.1-seed0", "ppo_gt-kl_coef0.05-seed0"}


def test_study_resources_are_validated(tmp_path):
    study = smoke_study_file(tmp_path, "bad", {"dpo": {"overrides": ["algo=dpo"]}},
                             resources={"processes": 3, "nodes": 2})
    out = run_cli(["study", f"study={study}", "phase=list"], tmp_path, check=False)
    assert out.returncode == 2 and "resources.processes=3 is not a multiple of resources.nodes=2" in out.stderr
