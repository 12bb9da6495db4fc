"""The arms beyond DPO and PPO, end to end on tiny models through the console script: RLOO and GRPO (critic-free
RLHF on PPO's rollout), online and iterative DPO with their annotators, the DPO paper's Preferred-FT and
Unlikelihood baselines; exact resume after SIGKILL for RLOO and for iterative DPO mid-round."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from rlhf_lab.config import validate_run_config
from rlhf_lab.config_keys import check_keys_are_read
from rlhf_lab.eval.points import MACHINE_COLUMNS
from rlhf_lab.utils.errors import ConfigError
from tests.conftest import workspace_with_shared_cache
from tests.cli import kill_after_checkpoint, run_cli
from tests.test_config import composed
from tests.test_pipeline_smoke import DPO_BATCH, TINY_BASE, comparable_points, without

pytestmark = pytest.mark.integration

NO_RM = without(TINY_BASE, "preferences.")          # arms on the gold reward train no reward model
ON_POLICY = ["train.steps=4", "eval.every=2", "train.checkpoint_every=1", "algo.response_length=10",
             "train.save_model=false"]
RLOO = ["algo.rollout_batch_size=4", "algo.samples_per_prompt=2", "algo.micro_batch_size=4", "algo.actor_lr=1e-3"]
ONLINE = ["algo.rollout_batch_size=8", "algo.micro_batch_size=4", "algo.actor_lr=1e-3"]
VOLATILE = ("per_s", *MACHINE_COLUMNS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_stage_cache):
    return workspace_with_shared_cache(tmp_path_factory, "arms", shared_stage_cache)


def args_for(workspace: Path, run_dir: Path, *extra: str, base=NO_RM) -> list[str]:
    return [*base, *ON_POLICY, *extra, f"output_root={workspace}", f"hydra.run.dir={run_dir}"]


def train_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(s in k for s in VOLATILE)} for r in rows]


def step_metrics(run_dir: Path, key: str) -> list[dict]:
    """The training steps' rows of metrics.jsonl (evaluation rows are interleaved): those that log `key`."""
    return [m for m in train_metrics(run_dir) if key in m]


def points(run_dir: Path) -> list[dict]:
    with open(run_dir / "points.csv") as f:
        return list(csv.DictReader(f))


def uninterrupted(workspace: Path, name: str, *extra: str) -> Path:
    """A run of `extra` (once per workspace: the smoke test and the kill test share it)."""
    whole = workspace / f"{name}-whole"
    if not (whole / "_COMPLETE").exists():
        run_cli(args_for(workspace, whole, *extra), workspace)
    return whole


def assert_resume_reproduces(workspace: Path, name: str, *extra: str, kill_at: int = 2) -> None:
    """An uninterrupted run, and one SIGKILLed after step `kill_at`'s checkpoint then resumed: same metrics, same
    points."""
    whole, killed = uninterrupted(workspace, name, *extra), workspace / f"{name}-killed"
    kill_after_checkpoint(args_for(workspace, killed, *extra), workspace, killed, kill_at)
    out = run_cli(args_for(workspace, killed, *extra), workspace)
    assert "resumed from" in out.stderr + out.stdout
    assert train_metrics(killed) == train_metrics(whole)
    assert comparable_points(killed / "points.csv") == comparable_points(whole / "points.csv")


RLOO_GOLD = ("algo=rloo", "algo.reward=gold", *RLOO)


def test_rloo_on_the_gold_reward(workspace):
    rows = points(uninterrupted(workspace, "rloo", *RLOO_GOLD))
    assert [r["step"] for r in rows] == ["0", "2", "4"]
    assert {r["method"] for r in rows} == {"rloo_gt"} and rows[0]["kl_coef"] == "0.05"
    assert len(step_metrics(workspace / "rloo-whole", "objective/kl")) == 4       # logged every step
    assert int(rows[-1]["train_samples"]) == 4 * 4 * 2                            # steps × prompts × k


@pytest.mark.slow   # the CI budget: iterative DPO's kill test covers the same on-policy checkpoint, plus its buffer
def test_rloo_resumes_exactly_after_sigkill(workspace):
    assert_resume_reproduces(workspace, "rloo", *RLOO_GOLD)


def test_grpo_on_the_normalised_gold_reward_with_lora(workspace):
    """GRPO on the gold reward, its actor a LoRA adapter (the reference: the same model with it off)."""
    run_dir = workspace / "grpo"
    run_cli(args_for(workspace, run_dir, "algo=grpo", *RLOO, "algo.reward=gold", "lora.r=4"), workspace)
    rows = points(run_dir)
    assert rows[-1]["method"] == "grpo_gt" and rows[-1]["proxy_reward_mean"] != "" and rows[-1]["lora_r"] == "4"
    assert float(rows[-1]["kl_mean"]) > 0                     # the adapter moved the policy off its reference
    metrics = step_metrics(run_dir, "objective/advantage_abs")
    assert len(metrics) == 4 and metrics[-1]["policy/approxkl_avg"] >= 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "critic" not in summary["compute_per_role"]      # no critic role: nothing trained or counted for it
    assert 0 < summary["lora"]["trainable_params"] < summary["lora"]["total_params"]


def test_iterative_dpo_resumes_mid_round_exactly(workspace):
    """refresh_every=3: the kill lands after step 2, inside the first round; the resumed run must train steps 3
    on the checkpointed buffer, not on fresh samples."""
    assert_resume_reproduces(workspace, "iterative", "algo=iterative_dpo", "algo.refresh_every=3", *ONLINE)
    rows = points(workspace / "iterative-whole")
    assert rows[-1]["method"] == "iterative_dpo" and rows[-1]["beta"] == "0.1"
    metrics = step_metrics(workspace / "iterative-whole", "annotator/pairs")
    assert len(metrics) == 4 and all(m["annotator/pairs"] == 24 for m in metrics)          # one round of 3 × 8 pairs per 3 steps
    assert all(m["annotator/gold_agreement"] == 1.0 for m in metrics)  # the gold annotator agrees with gold


def test_online_dpo_labels_come_from_the_annotator(workspace):
    """The gold annotator agrees with gold on every pair it decides; flipped (an annotator that always prefers the
    lower-gold completion) it agrees on none, and the policy it trains ends below the one gold labels train."""
    final_gold = {}
    for flip in (0.0, 1.0):
        run_dir = workspace / f"online-flip{flip:g}"
        run_cli(args_for(workspace, run_dir, "algo=online_dpo", f"algo.annotator_flip_rate={flip}", "train.steps=8",
                         "eval.every=8", "algo.rollout_batch_size=16", "algo.micro_batch_size=16",
                         "algo.actor_lr=3e-3", "algo.warmup_steps=0"), workspace)
        agreement = [m["annotator/gold_agreement"] for m in step_metrics(run_dir, "annotator/gold_agreement")]
        assert agreement == [1.0 - flip] * 8
        rows = points(run_dir)
        assert rows[-1]["method"] == "online_dpo" and "-gold-" in rows[-1]["run_id"]
        final_gold[flip] = float(rows[-1]["gold_reward_mean"])
    assert final_gold[1.0] < final_gold[0.0]


def test_a_callable_annotator_prefers_the_higher_score():
    from rlhf_lab.rewards.annotators import build_annotator

    annotator = build_annotator("callable:tests.ppo_rewards:length_reward")
    labels = annotator.label(["p", "p", "p"], ["long one", "a", "same"], ["short", "longer", "same"])
    assert labels.first_wins.tolist()[:2] == [True, False] and labels.decided.tolist() == [True, True, False]
    assert labels.ties == 1


@pytest.mark.parametrize("algo,expected", [("algo=preferred_ft", "dpo-sft-seed0"),
                                           ("algo=unlikelihood", "dpo-unlikelihood-alpha0.5-seed0")])
def test_the_dpo_papers_baselines_train(workspace, algo, expected):
    run_dir = workspace / algo.split("=")[1]
    extra = [algo, "algo.unlikelihood_alpha=0.5"] if "unlikelihood" in algo else [algo]
    run_cli([*TINY_BASE, *DPO_BATCH, *extra, f"output_root={workspace}", f"hydra.run.dir={run_dir}",
             "train.save_model=false"], workspace)
    rows = points(run_dir)
    assert rows[-1]["run_id"] == expected and rows[-1]["beta"] == ""
    assert rows[-1]["loss_type"] == algo.split("=")[1].replace("preferred_ft", "sft")


@pytest.mark.parametrize("name", ["rloo", "grpo", "online_dpo", "iterative_dpo", "preferred_ft", "unlikelihood"])
def test_every_new_algo_file_validates(name):
    cfg = validate_run_config(composed(f"algo={name}"))
    assert cfg.algo.name == {"iterative_dpo": "online_dpo", "preferred_ft": "dpo", "unlikelihood": "dpo"}.get(name,
                                                                                                          name)


@pytest.mark.parametrize("overrides, message", [
    (("algo=grpo", "algo.kl_estimator=k1"), "algo.kl_estimator"),
    (("algo=rloo", "algo.samples_per_prompt=1"), "algo.samples_per_prompt"),
    (("algo=rloo", "algo.scale_rewards=false"), "algo.scale_rewards"),
    (("algo=rloo", "algo.micro_batch_size=5"), "algo.micro_batch_size"),
    (("algo=online_dpo", "algo.annotator=judge:nope"), "no judge preset 'nope'"),
    (("algo=online_dpo", "algo.annotator=callable:tests.ppo_rewards:missing"), "algo.annotator"),
    (("algo=online_dpo", "algo.annotator=oracle"), "algo.annotator"),
    (("algo=online_dpo", "algo.loss_type=kto"), "algo.loss_type"),
    (("algo=online_dpo", "algo.annotator_flip_rate=2"), "algo.annotator_flip_rate"),
    (("algo=unlikelihood", "algo.unlikelihood_alpha=-1"), "unlikelihood_alpha"),
])
def test_bad_arm_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run_config(composed(*overrides))


def test_batch_keys_of_offline_dpo_are_refused_for_online_dpo():
    cfg = validate_run_config(composed("algo=online_dpo"))
    with pytest.raises(ConfigError, match="train.batch_size.*algo.rollout_batch_size"):
        check_keys_are_read(cfg, ["train.batch_size"])
    check_keys_are_read(validate_run_config(composed("algo=online_dpo", "algo.annotator=reward_model")),
                        ["reward_model.steps"])     # read: the reward model labels


def test_online_dpo_curves_are_named_by_their_annotator():
    from rlhf_lab.eval.frontier import method_label
    from rlhf_lab.recipes.run import run_identity

    identity = run_identity(validate_run_config(composed("algo=online_dpo", "algo.annotator=reward_model",
                                                         "algo.annotator_flip_rate=0.2")))
    assert identity.method == "online_dpo@reward_model"
    assert identity.run_id == "online_dpo-sigmoid-beta0.1-reward_model-flip0.2-seed0"
    assert method_label(identity.method, "sigmoid") == "online_dpo · labels by reward_model"
    assert method_label("iterative_dpo", "ipo") == "iterative_dpo (ipo)"
