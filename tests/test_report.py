"""The report's files and tables without a browser (the browser test covers rendering)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from rlhf_lab.eval import frontier as fr
from rlhf_lab.eval import convergence, paired
from rlhf_lab.study import report_tables as rt
from rlhf_lab.study.plots import FIGURE_TITLES
from rlhf_lab.study.report import frontier_summary_text, print_frontier_summary, write_report
from tests.synthetic_study import write_synthetic_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = write_synthetic_study(tmp_path_factory.mktemp("s") / "synthetic", judged=True)
    (d / "runs" / "dpo-beta0.1-seed0" / "error.txt").write_text("Traceback...\nRuntimeError: deliberate failure\n")
    return d


def test_write_report_writes_figures_and_is_deterministic(study):
    path = write_report(study)
    first = path.read_bytes()
    names = sorted(p.name for p in (study / "figures").iterdir())
    assert names == sorted([f"{n}.png" for n in FIGURE_TITLES] + [f"{n}.html" for n in FIGURE_TITLES])
    assert not [p for p in study.rglob("*.tmp")]  # atomic writes leave no temporaries
    assert write_report(study).read_bytes() == first
    text = first.decode()
    assert "RuntimeError: deliberate failure" in text       # failed runs shown with their last lines
    assert "0123456789abcdef" in text and "reward_model" in text  # git SHA and stage times from study.json
    assert "Methods compared at each KL budget" in text and "over 3 seeds —" in text   # paired comparisons


def test_per_run_table_final_step_and_wall_time(study):
    inputs = rt.load_inputs(study)
    table = rt.per_run_table(inputs)
    points = pd.read_csv(study / "points.csv")
    assert len(table) == points["run_id"].nunique()
    assert (table["step"] == 30).all()
    assert set(table["wall time (s)"]) == {"12"}  # from each run's summary.json (study.json has none)
    row = table[table["run"] == "ppo-kl_coef0.05-seed1"].iloc[0]
    final = points[(points["run_id"] == "ppo-kl_coef0.05-seed1") & (points["step"] == 30)].iloc[0]
    assert row["gold reward ± SE"] == f"{final['gold_reward_mean']:.3f} ± 0.015"
    assert row["method"] == "ppo" and row["setting"] == "kl_coef=0.05"


def test_study_json_run_seconds_take_precedence(tmp_path):
    d = write_synthetic_study(tmp_path / "s", seeds=(0,))
    meta = json.loads((d / "study.json").read_text())
    meta["run_seconds"] = {"ipo-beta0.5-seed0": 99.4}
    (d / "study.json").write_text(json.dumps(meta))
    wall = rt.run_wall_seconds(rt.load_inputs(d))
    assert wall["ipo-beta0.5-seed0"] == 99.4 and wall["ppo-kl_coef0.2-seed0"] == 12.5


def test_judge_tables(study):
    inputs = rt.load_inputs(study)
    assert rt.judge_names(inputs.points) == ["oracle"]
    table = rt.judge_points_table(inputs.points)
    final = rt.final_rows(inputs.points)
    r = final.iloc[0]
    expected = (f"{r['judge_oracle_win_rate']:.3f} [{r['judge_oracle_ci_low']:.3f}, "
                f"{r['judge_oracle_ci_high']:.3f}]")
    assert table.iloc[0]["oracle win rate [95% CI]"] == expected
    assert list(rt.load_judgements(study)["judge"].unique()) == ["oracle"]


def test_corrupt_study_json_is_a_note_not_a_crash(tmp_path):
    d = write_synthetic_study(tmp_path / "s", seeds=(0,))
    (d / "study.json").write_text("{ not json")
    inputs = rt.load_inputs(d)
    assert inputs.meta == {} and any("unreadable" in n for n in inputs.notes)
    assert inputs.name == "synthetic"  # from the points table
    assert write_report(d).is_file()


def test_empty_study_dir_gives_a_report(tmp_path):
    path = write_report(tmp_path)
    assert "points.csv missing" in path.read_text()
    assert frontier_summary_text(pd.DataFrame()) == "(no points)"


def test_summary_text_is_the_budget_table(study, capsys):
    points = pd.read_csv(study / "points.csv")
    text = print_frontier_summary(study, budgets=[1.0, 5.0])
    assert capsys.readouterr().out.strip() == text.strip()
    assert text.startswith(fr.budget_table_text(fr.best_at_kl_budgets(points, [1.0, 5.0])))
    assert "SFT start: gold 0.480" in text
    sentences = paired.paired_comparisons(points, [1.0, 5.0])["sentence"]
    assert len(sentences) > 0 and "paired over seeds:\n" + "\n".join(sentences) in text
    assert text.endswith("".join(f"\nwarning: {w}" for w in convergence.convergence_warnings(points)))
