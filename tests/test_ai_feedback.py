"""AI-feedback labels and the reward-model filter for the DPO family (recipes/pair_labels.py, label_stages.py):
relabelling by an annotator, agreement with the gold reward, the margin filter, their stage keys (the gold
stages' keys unchanged), start-up errors, run naming, and two tiny runs through the real CLI."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_lab.config import PreferenceGenConfig
from rlhf_lab.config_keys import check_keys_are_read
from rlhf_lab.eval.frontier import method_label
from rlhf_lab.judges.config import load_judge_preset
from rlhf_lab.judges.oracle import OracleJudge, gold_scorer
from rlhf_lab.recipes.label_stages import label_in_chunks
from rlhf_lab.recipes.pair_labels import filter_records, relabel_records
from rlhf_lab.recipes.run import run_identity
from rlhf_lab.recipes.stage_keys import stage_keys
from rlhf_lab.recipes.stages import preference_key
from rlhf_lab.rewards.annotators import JudgeAnnotator, build_annotator
from rlhf_lab.rewards.gold import VaderReward
from rlhf_lab.study.report_tables import preference_labels_table
from rlhf_lab.study.runner import compose_run_config
from rlhf_lab.utils.cache import stable_hash
from rlhf_lab.utils.errors import ConfigError
from tests.cli import run_cli
from tests.test_pipeline_smoke import TINY, read_points

GOOD = ["a wonderful, beautiful and moving film", "great acting and a lovely story", "i loved every minute"]
BAD = ["an awful, boring and painful mess", "terrible acting and a horrible plot", "i hated every minute"]
NEUTRAL = ("the film", "a film")          # equal gold (VADER 0): a tie no annotator may decide


def pairs_with_noise(gold) -> tuple[list[dict], int]:
    """Rows of (good, bad) completions per prompt, every third stored the wrong way round (as label noise would),
    plus one tie; gold scores as preference generation writes them. Returns (rows, how many are reversed)."""
    rows, reversed_rows = [], 0
    for p, prompt in enumerate(["Review: ", "My verdict: ", "In short, "]):
        for i, (good, bad) in enumerate(zip(GOOD, BAD)):
            chosen, rejected = (bad, good) if (p + i) % 3 == 0 else (good, bad)
            reversed_rows += chosen == bad
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rows.append({"prompt": "Review: ", "chosen": NEUTRAL[0], "rejected": NEUTRAL[1]})
    for row in rows:
        row["chosen_score"], row["rejected_score"] = (float(s) for s in gold.score(
            [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]))
    return rows, reversed_rows


def test_the_oracle_judge_relabels_to_the_gold_labels():
    gold = VaderReward()
    rows, reversed_rows = pairs_with_noise(gold)
    labels = label_in_chunks(build_annotator("judge:oracle", gold=gold), rows)
    out, info = relabel_records(rows, labels)
    assert info["flipped"] == reversed_rows > 0 and info["ties"] == 1 and info["invalid"] == 0
    assert info["pairs_in"] == len(rows) and info["pairs_out"] == len(rows) - 1 == len(out)
    assert all(r["chosen_score"] > r["rejected_score"] for r in out)      # gold scores moved with their text
    agreement = info["agreement_with_gold"]
    assert agreement["all"]["rate"] == 1.0 and agreement["all"]["pairs"] == len(rows) - 1
    assert (agreement["all"]["ci_low"], agreement["all"]["ci_high"]) == (1.0, 1.0)
    assert agreement["clear_cut"]["rate"] == 1.0 and agreement["reference"] == "gold scores"


def test_an_adversarial_labeller_disagrees_with_gold_and_flips_the_pairs():
    """An oracle judge reading the negated gold reward: the worst possible annotator, agreement 0."""
    gold = VaderReward()
    rows, reversed_rows = pairs_with_noise(gold)
    inverted = OracleJudge(lambda prompts, texts: -gold_scorer(gold)(prompts, texts), load_judge_preset("oracle"))
    out, info = relabel_records(rows, label_in_chunks(JudgeAnnotator(inverted, "judge:inverted"), rows))
    decided = len(rows) - 1
    assert info["agreement_with_gold"]["all"]["rate"] == 0.0
    assert info["flipped"] == decided - reversed_rows and info["undecided_dropped"] == 1
    assert all(r["chosen_score"] < r["rejected_score"] for r in out)


def test_the_reward_model_filter_drops_the_pairs_it_disagrees_with_and_counts_them():
    gold = VaderReward()
    rows, reversed_rows = pairs_with_noise(gold)
    # a reward model that ranks as gold does: its margin is negative on exactly the reversed rows
    margin = torch.tensor([r["chosen_score"] - r["rejected_score"] for r in rows], dtype=torch.float64)
    margin[-1] = float("nan")                                            # a score the model could not give
    kept, info = filter_records(rows, margin, threshold=0.0)
    assert info["pairs_in"] == len(rows) and info["dropped"] == reversed_rows + 1 == len(rows) - len(kept)
    assert info["dropped_nonfinite"] == 1 and info["pairs_out"] == len(kept)
    assert info["agreement_with_gold_kept"]["rate"] == 1.0 and info["agreement_with_gold_dropped"]["rate"] == 0.0
    strict, strict_info = filter_records(rows, margin, threshold=10.0)  # a margin nothing clears
    assert strict == [] and strict_info["dropped"] == len(rows)


def test_stage_keys_per_labeller_and_filter_and_the_gold_keys_unchanged():
    # the generated pairs' key as it was before labeler / filter existed (computed at commit 99b3b62)
    assert stable_hash(preference_key("task", "model", PreferenceGenConfig(), "classifier", 0)) == "0aaeb2f7cd1b"
    base = stage_keys(compose_run_config(["algo=dpo"]))
    assert not {"relabel", "filter"} & set(base)
    variants = {o: stage_keys(compose_run_config(["algo=dpo", *o])) for o in [
        ("preferences.labeler=judge:oracle",), ("preferences.labeler=judge:smollm2",),
        ("preferences.labeler=reward_model",), ("preferences.filter=reward_model",),
        ("preferences.filter=reward_model", "preferences.filter_margin=0.5"),
        ("preferences.labeler=judge:oracle", "preferences.filter=reward_model")]}
    for keys in variants.values():     # PPO's reward model and the gold pairs are shared by every variant
        assert keys["preferences"] == base["preferences"] and keys["reward_model"] == base["reward_model"]
        assert keys["reference_logps"] != base["reference_logps"]
    relabels = [k["relabel"] for k in variants.values() if "relabel" in k]
    assert len(relabels) == 4 and len(set(relabels)) == 3                # oracle twice, then smollm2, RM
    filters = [k["filter"] for k in variants.values() if "filter" in k]
    assert len(set(filters)) == 3                                        # margin, and relabelled input pairs
    assert len({k["reference_logps"] for k in variants.values()}) == len(variants)


@pytest.mark.parametrize("overrides, match", [
    (["preferences.labeler=judge:nope"], r"'preferences.labeler': no judge preset 'nope' \(valid: .*oracle"),
    (["preferences.labeler=gpt4"], r"'preferences.labeler': expected one of gold \| reward_model"),
    (["preferences.filter=judge:oracle"], r"'preferences.filter': expected none \| reward_model"),
])
def test_bad_label_specs_fail_at_start_up_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_run_config(["algo=dpo", *overrides])


def test_an_api_judge_without_its_key_is_refused_at_start_up(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="'preferences.labeler'=judge:openai: .*OPENAI_API_KEY"):
        compose_run_config(["algo=dpo", "preferences.labeler=judge:openai"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert compose_run_config(["preferences.labeler=judge:openai"]).preferences.labeler == "judge:openai"


def test_label_keys_are_refused_where_nothing_reads_them():
    with pytest.raises(ConfigError, match="'preferences.labeler' is set but never read: algo=ppo"):
        check_keys_are_read(compose_run_config(["algo=ppo"]), ["preferences.labeler"])
    with pytest.raises(ConfigError, match="'preferences.filter_margin' is set but never read"):
        check_keys_are_read(compose_run_config(["algo=dpo"]), ["preferences.filter_margin"])
    with pytest.raises(ConfigError, match="'reward_model.steps' is set but never read"):
        check_keys_are_read(compose_run_config(["algo=dpo"]), ["reward_model.steps"])
    filtered = compose_run_config(["algo=dpo", "preferences.filter=reward_model"])
    check_keys_are_read(filtered, ["reward_model.steps", "preferences.filter_margin"])   # read: no error


def test_runs_and_curves_are_named_after_labeller_and_filter():
    named = {o: run_identity(compose_run_config(list(o))) for o in [
        ("algo=dpo",), ("preferences.labeler=judge:smollm2",), ("preferences.filter=reward_model", "algo=ipo"),
        ("preferences.labeler=reward_model", "preferences.filter=reward_model")]}
    assert [(i.method, i.run_id) for i in named.values()] == [
        ("dpo", "dpo-sigmoid-beta0.1-seed0"), ("dpo@judge:smollm2", "dpo-judge-smollm2-sigmoid-beta0.1-seed0"),
        ("fdpo", "fdpo-ipo-beta0.1-seed0"), ("fdpo@reward_model", "fdpo-reward_model-sigmoid-beta0.1-seed0")]
    assert [method_label(i.method, i.loss_type) for i in named.values()] == [
        "dpo (sigmoid)", "dpo (sigmoid) · labels by judge:smollm2", "ipo · RM-filtered",
        "dpo (sigmoid) · RM-filtered · labels by reward_model"]


# ------------------------------------------------------------------------------------------ through the CLI
RUN = [*TINY, "train.steps=2", "eval.every=2", "train.save_model=false"]
TINY_RM = ["reward_model.steps=4", "reward_model.batch_size=8", "reward_model.normalization_samples=8"]


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """One tiny DPO run whose pairs the oracle judge relabels and the reward model (trained on the gold pairs,
    as PPO's) then filters: both stages through the real CLI in one process start (CI budget)."""
    ws = tmp_path_factory.mktemp("ai_feedback")
    run_cli([*RUN, "preferences.labeler=judge:oracle", "preferences.filter=reward_model", *TINY_RM,
             f"output_root={ws}", f"hydra.run.dir={ws / 'runs' / 'fdpo_oracle'}"], ws)
    return ws


@pytest.mark.integration
def test_a_dpo_run_on_oracle_judge_labels_records_its_agreement(labelled_run):
    summary = json.loads((labelled_run / "runs" / "fdpo_oracle" / "summary.json").read_text())
    relabel = summary["preference_labels"]["relabel"]
    assert summary["preference_labels"]["labeler"] == relabel["labeler"] == "judge:oracle"
    assert relabel["flipped"] == 0 and relabel["agreement_with_gold"]["all"]["rate"] == 1.0
    assert relabel["pairs_out"] == relabel["pairs_in"] - relabel["ties"] - relabel["invalid"] > 0
    assert {"preferences", "reward_model", "relabel", "filter", "reference_logps"} <= set(summary["stage_seconds"])
    (stage,) = (labelled_run / "cache" / "relabel").glob("[0-9a-f]*")
    (prefs,) = (labelled_run / "cache" / "preferences").glob("[0-9a-f]*")
    # a noiseless oracle keeps the generated pairs as they were
    assert (stage / "pairs.jsonl").read_text() == (prefs / "pairs.jsonl").read_text()
    table = preference_labels_table(labelled_run)
    assert list(table["run"]) == ["fdpo_oracle"]
    assert table["agreement with gold [95% CI]"][0].startswith("1.000 [1.000, 1.000]")


@pytest.mark.integration
def test_a_filtered_dpo_run_counts_what_the_reward_model_dropped(labelled_run):
    run_dir = labelled_run / "runs" / "fdpo_oracle"
    labels = json.loads((run_dir / "summary.json").read_text())["preference_labels"]
    kept = labels["filter"]
    assert kept["pairs_in"] == labels["relabel"]["pairs_out"]                # it filters the relabelled pairs
    assert kept["pairs_in"] == kept["pairs_out"] + kept["dropped"] and kept["pairs_out"] > 0
    assert kept["margin"] == 0.0 and kept["margin_units"] == "normalised"
    (stage,) = (labelled_run / "cache" / "filter").glob("[0-9a-f]*")
    assert len((stage / "pairs.jsonl").read_text().splitlines()) == kept["pairs_out"]
    rows = read_points(run_dir / "points.csv")
    assert {r["method"] for r in rows} == {"fdpo@judge:oracle"}
    assert rows[0]["run_id"] == "fdpo-judge-oracle-sigmoid-beta0.1-seed0"
    # the reward model that filtered is PPO's: trained on the gold pairs, under PPO's stage key
    (rm_dir,) = (labelled_run / "cache" / "reward_model").glob("[0-9a-f]*")
    assert rm_dir.name == stage_keys(compose_run_config([*TINY, *TINY_RM, "algo=ppo"]))["reward_model"]
