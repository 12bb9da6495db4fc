"""End-to-end on tiny models through the real CLI: SFT → preferences → reference cache → DPO → evaluation.

Runs share one stage cache (session fixture) so each test adds only its own few training steps.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_lab.eval.points import MACHINE_COLUMNS, POINT_COLUMNS
from tests.cli import run_cli

pytestmark = pytest.mark.integration

# tiny stages for every algorithm; the DPO family's batch keys separately (PPO reads algo.rollout_batch_size and
# refuses train.batch_size as a key it never reads)
TINY_BASE = [
    "model=gpt2_micro", "logger=none", "task.max_train_reviews=2000", "task.vocab_size=512",
    "task.num_train_prompts=48", "task.num_test_prompts=16", "sft.steps=20", "sft.batch_size=16", "sft.seq_len=32",
    "preferences.max_new_tokens=12", "data.max_completion_length=13", "train.steps=3", "eval.every=2",
    "eval.max_new_tokens=12",
]
DPO_BATCH = ["train.batch_size=8", "train.micro_batch_size=4"]
TINY = [*TINY_BASE, *DPO_BATCH]


def without(args: list[str], *prefixes: str) -> list[str]:
    """`args` less the overrides of keys under `prefixes` (keys a run would refuse as never read)."""
    return [a for a in args if not a.startswith(prefixes)]


WITH_SOURCE = without(TINY, "preferences.")   # data.source replaces the generated pairs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="module")
def first_run(workspace):
    run_dir = workspace / "run_a"
    run_cli([*TINY, f"output_root={workspace}", f"hydra.run.dir={run_dir}"], workspace)
    return run_dir


def read_points(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def comparable_points(path: Path) -> list[dict]:
    """The rows without the columns that depend on the machine and its load (wall seconds, peak memory)."""
    return [{k: v for k, v in row.items() if k not in MACHINE_COLUMNS} for row in read_points(path)]


def test_run_writes_points_config_versions_and_model(first_run, workspace):
    rows = read_points(first_run / "points.csv")
    assert list(rows[0].keys()) == POINT_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 2, 3]          # step 0, every 2 steps, and the end
    assert float(rows[0]["kl_mean"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert all(float(r["kl_mean"]) >= 0 for r in rows)
    assert all(0 <= float(r["gold_reward_mean"]) <= 1 for r in rows)
    assert rows[0]["method"] == "dpo" and rows[0]["loss_type"] == "sigmoid" and float(rows[0]["beta"]) == 0.1
    cfg = yaml.safe_load((first_run / "config.yaml").read_text())
    assert cfg["algo"]["beta"] == 0.1 and cfg["model"]["config"]["n_layer"] == 2
    versions = json.loads((first_run / "versions.json").read_text())
    assert versions["torch"].startswith("2.") and "transformers" in versions
    assert "sha" in json.loads((first_run / "git.json").read_text())
    metrics = [json.loads(line) for line in (first_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "train/loss" in m]
    assert {"train/rewards/chosen", "train/rewards/accuracies", "train/logps/rejected"} <= set(train_rows[0])
    assert (first_run / "_COMPLETE").exists()


def test_saved_policy_and_sft_load_with_auto_classes(first_run, workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in [first_run / "model", *sorted((workspace / "cache" / "sft").glob("[0-9a-f]*"))]:
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.pad_token_id != tok.eos_token_id
        assert model.config.vocab_size == len(tok)


def test_reference_is_frozen_and_cached_once(first_run, workspace):
    """The reference log-prob table equals a fresh pass of the SFT model after training, and a second run
    (another β) reuses every stage instead of rebuilding it."""
    from rlhf_lab.data.collate import collate_pairs
    from rlhf_lab.data.formats import load_preference_pairs
    from rlhf_lab.data.tokenize import TruncationConfig, tokenize_pairs
    from rlhf_lab.models.build import load_causal_lm, load_tokenizer
    from rlhf_lab.models.logprobs import sequence_logps

    cache = workspace / "cache"
    (sft_dir,) = sorted((cache / "sft").glob("[0-9a-f]*"))
    (ref_dir,) = sorted((cache / "reference_logps").glob("[0-9a-f]*"))
    (pref_dir,) = sorted((cache / "preferences").glob("[0-9a-f]*"))
    table = torch.load(ref_dir / "reference_logps.pt")
    tok = load_tokenizer(sft_dir)
    pairs, _ = load_preference_pairs(str(pref_dir / "pairs.jsonl"), "train", tok)
    tokenized, _ = tokenize_pairs(pairs, tok, TruncationConfig(16, 13, "truncate"))
    reference = load_causal_lm(sft_dir).eval()
    batch = collate_pairs(tokenized[:8], tok.pad_token_id, table)
    with torch.no_grad():
        fresh = sequence_logps(reference, batch.sequences)
    torch.testing.assert_close(fresh, batch.reference_logps, rtol=0, atol=1e-4)

    mtimes = {p: p.stat().st_mtime for p in cache.rglob("_COMPLETE")}
    run_cli([*TINY, "algo.beta=0.5", f"output_root={workspace}", f"hydra.run.dir={workspace / 'run_b'}"], workspace)
    assert {p: p.stat().st_mtime for p in cache.rglob("_COMPLETE")} == mtimes  # nothing rebuilt
    assert read_points(workspace / "run_b" / "points.csv")[-1]["beta"] == "0.5"


def test_cpu_runs_are_deterministic(first_run, workspace):
    run_cli([*TINY, f"output_root={workspace}", f"hydra.run.dir={workspace / 'run_a2'}"], workspace)
    a = comparable_points(first_run / "points.csv")
    b = comparable_points(workspace / "run_a2" / "points.csv")
    assert a == b


@pytest.mark.parametrize("launcher", ["basic", pytest.param("local", marks=pytest.mark.slow)])   # local = joblib
def test_multirun_launcher_sweeps_beta(workspace, launcher):
    sweep = workspace / f"sweep_{launcher}"
    run_cli(["-m", *TINY, "train.steps=1", "eval.every=1", "algo.beta=0.05,1", f"output_root={workspace}",
             f"hydra.sweep.dir={sweep}", f"hydra/launcher={launcher}"], workspace)
    betas = sorted(float(read_points(p)[0]["beta"]) for p in sweep.glob("*/points.csv"))
    assert betas == [0.05, 1.0]


# every loss is checked against hand-computed values in test_preference_losses.py; through the CLI, two here and
# the rest with -m slow (CI budget)
@pytest.mark.parametrize("algo", ["ipo", "kto", *(pytest.param(a, marks=pytest.mark.slow) for a in ("simpo", "orpo", "rpo"))])
def test_family_members_train(workspace, algo):
    run_dir = workspace / f"fam_{algo}"
    run_cli([*TINY, f"algo={algo}", "train.steps=2", "eval.every=2", "train.save_model=false",
             f"output_root={workspace}", f"hydra.run.dir={run_dir}"], workspace)
    rows = read_points(run_dir / "points.csv")
    assert rows[-1]["loss_type"] == algo and int(rows[-1]["step"]) == 2
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 2 and all(isinstance(v, float) for v in losses)


def test_wandb_offline_run_is_written(workspace):
    run_dir = workspace / "wb"
    run_cli([*TINY, "logger=wandb", "train.steps=1", "eval.every=1", "train.save_model=false",
             f"output_root={workspace}", f"hydra.run.dir={run_dir}"], workspace)
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0


def test_missing_dataset_path_is_a_clear_error(workspace):
    out = run_cli([*WITH_SOURCE, "data.source=/nonexistent/prefs.jsonl", f"output_root={workspace}",
                   f"hydra.run.dir={workspace / 'bad'}"], workspace, check=False)
    assert out.returncode == 2
    assert "/nonexistent/prefs.jsonl" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_user_dataset_file_with_bad_rows_is_counted(workspace, first_run):
    """A local TRL-format JSONL with bad rows: they are skipped and counted in the log, training proceeds."""
    (pref_dir,) = sorted((workspace / "cache" / "preferences").glob("[0-9a-f]*"))
    rows = [json.loads(x) for x in (pref_dir / "pairs.jsonl").read_text().splitlines()][:40]
    rows += [{"prompt": "a", "chosen": "same", "rejected": "same"}, {"prompt": "b", "chosen": ""},
             {"prompt": "c", "chosen": 3, "rejected": "x"}]
    path = workspace / "user_prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run_cli([*WITH_SOURCE, f"data.source={path}", "train.steps=1", "eval.every=1", "train.save_model=false",
                   f"output_root={workspace}", f"hydra.run.dir={workspace / 'user'}"], workspace)
    log_text = out.stdout + out.stderr
    assert "kept 40/43 rows" in log_text


def test_bring_your_own_model_and_dataset(workspace, first_run):
    """task=none: any causal LM by local path, a TRL-format file; evaluation on held-out prompts, KL only."""
    (sft_dir,) = sorted((workspace / "cache" / "sft").glob("[0-9a-f]*"))
    (pref_dir,) = sorted((workspace / "cache" / "preferences").glob("[0-9a-f]*"))
    path = workspace / "byo.jsonl"
    path.write_text((pref_dir / "pairs.jsonl").read_text())
    run_dir = workspace / "byo"
    run_cli(["task=none", "model=hf", f"model.name_or_path={sft_dir}", f"data.source={path}", "logger=none",
             "data.max_completion_length=13", "train.steps=2", "train.batch_size=8", "train.micro_batch_size=8",
             "eval.every=2", "eval.num_prompts=6", "eval.max_new_tokens=8", "train.save_model=false",
             f"output_root={workspace}", f"hydra.run.dir={run_dir}"], workspace)
    rows = read_points(run_dir / "points.csv")
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert rows[0]["gold_reward_mean"] == ""            # no gold reward without a task
    assert int(rows[0]["samples"]) == 6 and float(rows[-1]["kl_mean"]) > 0


def test_unpaired_kto_dataset_end_to_end(workspace, first_run):
    """A KTO-style file (prompt/completion/label): parsed as unpaired rows (bad labels counted, not dropped
    silently), its own (num_rows,) reference table cached, KTO trains on it; a paired loss on it is refused
    before anything trains."""
    (pref_dir,) = sorted((workspace / "cache" / "preferences").glob("[0-9a-f]*"))
    pairs = [json.loads(x) for x in (pref_dir / "pairs.jsonl").read_text().splitlines()][:40]
    rows = [r for p in pairs for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                       {"prompt": p["prompt"], "completion": p["rejected"], "label": 0})]
    rows += [{"prompt": "a", "completion": "b", "label": "yes"}, {"prompt": "c", "completion": "", "label": 1}]
    path = workspace / "unpaired.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = [*WITH_SOURCE, f"data.source={path}", "train.steps=2", "eval.every=2", "train.save_model=false",
              f"output_root={workspace}"]

    refused = run_cli([*common, "algo=dpo", f"hydra.run.dir={workspace / 'unpaired_dpo'}"], workspace, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "unpaired rows" in refused.stderr and str(path) in refused.stderr
    assert not (workspace / "unpaired_dpo" / "points.csv").exists()

    before = set((workspace / "cache" / "reference_logps").glob("[0-9a-f]*"))
    out = run_cli([*common, "algo=kto", f"hydra.run.dir={workspace / 'unpaired_kto'}"], workspace)
    assert "kept 80/82 rows" in out.stdout + out.stderr
    (table_dir,) = set((workspace / "cache" / "reference_logps").glob("[0-9a-f]*")) - before
    table = torch.load(table_dir / "reference_logps.pt")
    assert table.shape == (82,) and torch.isfinite(table[:80]).all() and torch.isnan(table[80:]).all()
    # the same completions scored as pairs by the first run's table (its rows are pairs.jsonl's rows)
    paired = [torch.load(d / "reference_logps.pt") for d in before]
    paired = next(t for t in paired if t.dim() == 2 and t.shape[0] >= 40)
    torch.testing.assert_close(table[:80].view(40, 2), paired[:40], rtol=0, atol=1e-4)
    points = read_points(workspace / "unpaired_kto" / "points.csv")
    assert [int(r["step"]) for r in points] == [0, 2] and points[0]["loss_type"] == "kto"


def test_best_of_n_rows_from_one_set_of_samples(workspace, first_run):
    """algo=best_of_n on the first run's cached SFT model: rows for n = 1 (step 0), 2, 4, 8 (step = n), KL the
    closed-form bound, gold non-decreasing in n (the scorer is gold itself), and the samples the judges read."""
    from rlhf_lab.algos.best_of_n import kl_bound

    run_dir = workspace / "bon"
    args = [*without(TINY_BASE, "train.", "eval.every", "preferences.", "data."), "algo=best_of_n", "algo.samples=8"]
    run_cli([*args, f"output_root={workspace}", f"hydra.run.dir={run_dir}"], workspace)
    rows = read_points(run_dir / "points.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 8]
    assert {r["method"] for r in rows} == {"best_of_n"} and {r["loss_type"] for r in rows} == {"gold"}
    assert [float(r["kl_mean"]) for r in rows] == pytest.approx([kl_bound(n) for n in (1, 2, 4, 8)], abs=1e-12)
    gold = [float(r["gold_reward_mean"]) for r in rows]
    assert all(a <= b + 1e-12 for a, b in zip(gold, gold[1:])) and gold[-1] > gold[0]
    first = [json.loads(x) for x in (run_dir / "samples" / "step_000000.jsonl").read_text().splitlines()]
    best = [json.loads(x) for x in (run_dir / "samples" / "step_000008.jsonl").read_text().splitlines()]
    assert [r["index"] for r in best] == list(range(16)) == [r["index"] for r in first]
    assert all(b["gold"] >= f["gold"] for b, f in zip(best, first))      # the best of 8 includes sample 0
    refused = run_cli([*args, "train.steps=5", f"output_root={workspace}"], workspace, check=False)
    assert refused.returncode == 2 and "'train.steps' is set but never read" in refused.stderr
