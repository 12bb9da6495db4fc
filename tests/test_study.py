"""The study runner through the console script: phases, parallel points, failure isolation, reruns and status.

The real `smoke` study (conftest `smoke_study_dir`) runs once; a second study file written here reuses its stage
cache and adds a sweep point that fails at run time, to check that one failure neither stops the others nor
hides in the status."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rlhf_lab.eval.points import POINT_COLUMNS
from tests.cli import cli_env, run_cli

pytestmark = pytest.mark.integration
SMOKE_RUNS = ["dpo-beta0.1-seed0", "dpo-beta1-seed0", "ipo-beta0.5-seed0", "ppo-kl_coef0.05-seed0",
              "ppo_gt-kl_coef0.05-seed0", "best_of_n-samples8-seed0"]
FINAL_STEP = {run: 8 if run.startswith("best_of_n") else 3 for run in SMOKE_RUNS}   # best-of-n: step = n


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(list(args), cwd, check)


def test_list_phase_names_every_point_in_order(tmp_path):
    out = cli("study", "study=smoke", "phase=list", cwd=tmp_path)
    assert out.stdout.split() == SMOKE_RUNS


@pytest.mark.parametrize("args, message", [
    (["phase=bogus"], "phase='bogus'"),
    (["phase=point", "index=99"], "index=99: study 'smoke' has 6 points"),
    (["study=nosuchstudy"], "study 'nosuchstudy' not found"),
])
def test_bad_study_arguments_are_clear_errors(tmp_path, args, message):
    out = cli("study", "study=smoke", *args, f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_smoke_study_writes_points_records_and_every_arm(smoke_study_dir):
    points = pd.read_csv(smoke_study_dir / "points.csv")
    assert list(points.columns)[:len(POINT_COLUMNS)] == POINT_COLUMNS
    assert sorted(points["run_id"].unique()) == sorted(SMOKE_RUNS)
    assert set(points["method"]) == {"dpo", "ppo", "ppo_gt", "best_of_n"}
    assert points.groupby("run_id")["step"].max().to_dict() == FINAL_STEP
    assert pd.read_parquet(smoke_study_dir / "points.parquet").shape == points.shape
    study = json.loads((smoke_study_dir / "study.json").read_text())
    assert set(study["run_seconds"]) == set(SMOKE_RUNS) and study["git"]["sha"]
    assert {"stages", "runs", "aggregate"} <= set(study["phase_seconds"]) and "torch" in study["versions"]
    stages = json.loads((smoke_study_dir / "stages.json").read_text())
    built = {e["stage"] for e in stages.values() if "build_seconds" in e}
    assert built == {"task", "sft", "preferences", "reward_model", "reference_logps"}
    comparisons = pd.read_csv(smoke_study_dir / "comparisons.csv")   # one seed: differences without intervals
    assert len(comparisons) > 0 and (comparisons["verdict"] == "one seed: no interval").all()
    frontier = pd.read_csv(smoke_study_dir / "frontier.csv")
    assert set(frontier["method_label"]) <= {"dpo (sigmoid)", "ipo", "ppo", "ppo_gt",
                                             "best-of-n by gold (KL upper bound)"} and len(frontier) > 0
    results = pd.read_csv(smoke_study_dir / "results.csv")         # each setting's last evaluation, with its cost
    assert len(results) == len(SMOKE_RUNS) and (results["step"] == results["step"].clip(lower=1)).all()
    trained = results[results["method_label"] != "best-of-n by gold (KL upper bound)"]
    assert (trained["train_flops_mean"] > 0).all() and (trained["train_samples_mean"].notna()).all()
    assert sorted(p.name for p in (smoke_study_dir / "figures").glob("*.png")) == [
        "frontier.png", "kl_vs_step.png", "length_vs_reward.png", "reward_vs_step.png"]
    judged = points[points["judge_oracle_win_rate"].notna()]  # the study's oracle judge, on final steps only
    assert len(judged) == len(SMOKE_RUNS) and (judged["step"] == judged["run_id"].map(FINAL_STEP)).all()
    assert ((judged["judge_oracle_ci_low"] <= judged["judge_oracle_win_rate"])
            & (judged["judge_oracle_win_rate"] <= judged["judge_oracle_ci_high"])).all()
    judgements = pd.read_csv(smoke_study_dir / "judgements.csv")
    assert set(judgements["run_id"]) == set(SMOKE_RUNS) and (judgements["n"] == 8).all()
    report = (smoke_study_dir / "report.html").read_text()
    assert "dpo-beta0.1-seed0" in report and "ppo_gt-kl_coef0.05-seed0" in report


def test_rerun_reuses_every_stage_and_run(smoke_study_dir):
    root = smoke_study_dir.parent
    markers = sorted(root.rglob("_COMPLETE"))
    before = {p: p.stat().st_mtime_ns for p in markers}
    out = cli("study", "study=smoke", f"output_root={root}", cwd=root)
    assert {p: p.stat().st_mtime_ns for p in sorted(root.rglob("_COMPLETE"))} == before  # nothing rebuilt/rerun
    assert "6 runs" in out.stdout


def failing_study(tmp_path: Path, smoke_dir: Path) -> Path:
    """The smoke study's settings with one good DPO point and one whose dataset does not exist; it shares the
    smoke study's stage cache, so only the two runs cost time."""
    smoke = yaml.safe_load((Path(__file__).parents[1] / "conf/studies/smoke.yaml").read_text())
    spec = {"name": "flaky", "seeds": [0],
            "overrides": smoke["overrides"] + [f"cache_dir={smoke_dir.parent / 'cache'}"],
            "arms": {"good": {"overrides": ["algo=dpo"], "sweep": {"algo.beta": [0.1]}},
                     "broken": {"overrides": ["algo=dpo", "data.source=/nonexistent/pairs.jsonl"],
                                "sweep": {"algo.beta": [0.1]}}}}
    path = tmp_path / "flaky.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_failed_point_is_isolated_reported_and_rerun(tmp_path, smoke_study_dir):
    spec = failing_study(tmp_path, smoke_study_dir)
    out = cli("study", f"study={spec}", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert out.returncode == 1 and "FAILED runs: broken-beta0.1-seed0" in out.stdout
    points = pd.read_csv(tmp_path / "flaky" / "points.csv")
    assert set(points["run_id"]) == {"good-beta0.1-seed0"}
    assert not list((tmp_path / "cache").glob("*"))  # the shared cache was used, nothing built here

    status = cli("status", f"study={spec}", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert status.returncode == 1
    lines = status.stdout.splitlines()
    assert any(line.split()[:2] == ["done", "good-beta0.1-seed0"] for line in lines)
    assert any(line.split()[:2] == ["failed", "broken-beta0.1-seed0"] for line in lines)
    assert "/nonexistent/pairs.jsonl" in status.stdout     # the error's last lines are shown

    good = tmp_path / "flaky" / "runs" / "good-beta0.1-seed0" / "_COMPLETE"
    mtime = good.stat().st_mtime_ns
    again = cli("study", f"study={spec}", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert again.returncode == 1 and good.stat().st_mtime_ns == mtime  # only the missing point was retried


@pytest.mark.slow   # CI budget: the real SLURM array (test_slurm.py) runs phase=point from SLURM_ARRAY_TASK_ID too
def test_point_phase_runs_one_point_and_status_counts_the_rest(tmp_path, smoke_study_dir):
    spec = failing_study(tmp_path, smoke_study_dir)
    run_ids = cli("study", f"study={spec}", "phase=list", cwd=tmp_path).stdout.split()
    good = run_ids.index("good-beta0.1-seed0")
    run_cli(["study", f"study={spec}", "phase=point", f"output_root={tmp_path}"], tmp_path,
            env={**cli_env(), "SLURM_ARRAY_TASK_ID": str(good)})   # index from the array task id
    runs = tmp_path / "flaky" / "runs"
    assert (runs / "good-beta0.1-seed0" / "_COMPLETE").exists() and not (runs / "broken-beta0.1-seed0").exists()
    status = cli("status", f"study={spec}", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert "runs: 1 done, 1 missing" in status.stdout


def test_aggregate_logs_the_study_to_wandb_offline(tmp_path, smoke_study_dir):
    """The aggregate phase alone (what the SLURM aggregate job runs), with W&B on: one offline study run in the
    study's group holding the points table and the frontier chart."""
    import shutil

    shutil.copytree(smoke_study_dir, tmp_path / "smoke", ignore=shutil.ignore_patterns("model", "wandb"))
    out = cli("study", "study=smoke", "phase=aggregate", "logger=wandb", f"output_root={tmp_path}", cwd=tmp_path)
    assert "wandb sync" in out.stdout
    (run_file,) = (tmp_path / "smoke" / "wandb").glob("offline-run-*/run-*.wandb")
    payload = run_file.read_bytes()
    for key in (b"points", b"frontier", b"gold_vs_kl", b"figures/frontier", b"smoke-study"):
        assert key in payload, key
    assert pd.read_csv(tmp_path / "smoke" / "points.csv").shape == pd.read_csv(smoke_study_dir / "points.csv").shape
