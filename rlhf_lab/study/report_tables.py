"""The report's inputs, read defensively from a study directory, and the tables it shows (as DataFrames).

A study directory holds `points.csv` (the contract), usually `study.json` (written by the study runner: spec,
stage and run wall times, versions, git), `runs/<run_id>/summary.json` and, once judged, `judgements.csv` and
`judge_<name>_*` columns in the points table. Any of the optional files may be missing, partial or unreadable
(a study killed half-way still deserves a report), so every reader here returns something empty and a note
rather than raising.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rlhf_lab.eval import frontier as fr

JUDGE_COLUMN = re.compile(r"^judge_(?P<name>.+)_win_rate$")


@dataclass
class StudyInputs:
    study_dir: Path
    points: pd.DataFrame
    meta: dict                                       # study.json, {} when absent
    notes: list[str] = field(default_factory=list)   # what was missing or unreadable, shown in the report

    @property
    def name(self) -> str:
        if self.meta.get("study"):
            return str(self.meta["study"])
        if not self.points.empty and "study" in self.points and self.points["study"].notna().any():
            return str(self.points["study"].dropna().iloc[0])
        return self.study_dir.name


def _read_json(path: Path, notes: list[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} unreadable ({e.__class__.__name__}): ignored")
        return {}
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object: ignored")
        return {}
    return data


def load_inputs(study_dir: Path) -> StudyInputs:
    study_dir = Path(study_dir)
    notes: list[str] = []
    path = study_dir / "points.csv"
    points = pd.DataFrame()
    if path.is_file() and path.stat().st_size > 0:
        points = pd.read_csv(path)
    else:
        notes.append("points.csv missing or empty: no figures or tables")
    meta = _read_json(study_dir / "study.json", notes)
    if not meta:
        notes.append("study.json missing: no study config, versions or stage times")
    return StudyInputs(study_dir, points, meta, notes)


def run_wall_seconds(inputs: StudyInputs) -> dict[str, float]:
    """Wall time per run: study.json's run_seconds, else the run's own summary.json."""
    found = {k: float(v) for k, v in (inputs.meta.get("run_seconds") or {}).items() if v is not None}
    runs = inputs.study_dir / "runs"
    for summary in sorted(runs.glob("*/summary.json")) if runs.is_dir() else []:
        run_id = summary.parent.name
        if run_id not in found:
            seconds = _read_json(summary, []).get("seconds")
            if isinstance(seconds, (int, float)):
                found[run_id] = float(seconds)
    return found


def failed_runs(study_dir: Path, tail_lines: int = 4) -> list[tuple[str, str]]:
    """(run_id, last lines of error.txt) for every run the study runner recorded as failed."""
    runs = Path(study_dir) / "runs"
    out = []
    for err in sorted(runs.glob("*/error.txt")) if runs.is_dir() else []:
        lines = err.read_text(errors="replace").strip().splitlines()
        out.append((err.parent.name, "\n".join(lines[-tail_lines:])))
    return out


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column as numbers, all-NaN when the table lacks it (older or partial tables)."""
    if name not in df:
        return pd.Series(math.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce")


def final_rows(points: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation of every run (highest step)."""
    if points.empty:
        return points
    idx = points.groupby("run_id", sort=True)["step"].idxmax()
    return points.loc[idx.to_numpy()].reset_index(drop=True)


def _pm(mean: object, se: object, digits: int) -> str:
    def num(v: object) -> float:
        return float(v) if v not in ("", None) else math.nan
    m, s = num(mean), num(se)
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _num(value: object, fmt: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(v) else format(v, fmt)


def per_run_table(inputs: StudyInputs) -> pd.DataFrame:
    """Final step of each run: gold ± SE, KL ± SE, proxy, length and wall time (display strings)."""
    final = final_rows(inputs.points)
    if final.empty:
        return pd.DataFrame()
    wall = run_wall_seconds(inputs)
    return pd.DataFrame({
        "run": final["run_id"],
        "method": fr.method_labels(final).to_numpy(),
        "setting": [fr.setting_label(b, k, t) for b, k, t in
                    zip(_col(final, "beta"), _col(final, "kl_coef"), _col(final, "target_kl"))],
        "seed": final["seed"],
        "step": final["step"],
        "gold reward ± SE": [_pm(m, s, 3) for m, s in zip(final["gold_reward_mean"], final["gold_reward_se"])],
        "KL ± SE (nats)": [_pm(m, s, 2) for m, s in zip(final["kl_mean"], final["kl_se"])],
        "proxy reward": [_num(v, ".3f") for v in _col(final, "proxy_reward_mean")],
        "length": [_num(v, ".1f") for v in _col(final, "response_len_mean")],
        "train FLOPs": [_num(v, ".2g") for v in _col(final, "train_flops")],
        "train samples": [_num(v, ".0f") for v in _col(final, "train_samples")],
        "wall time (s)": [_num(wall.get(r), ".0f") for r in final["run_id"]],
    })


def budget_display_table(points: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """Best gold per method (rows) at each KL budget (columns), cells 'gold [CI] (setting, step)'."""
    return _best_gold_table(fr.best_at_kl_budgets(points, budgets), lambda r: f"KL ≤ {r['kl_budget']:g}",
                            lambda r: "")


def cost_budget_display_table(points: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """Best gold per method (rows) within each training-FLOP budget (columns), cells 'gold [CI] (setting, step)'."""
    return _best_gold_table(fr.best_at_cost_budgets(points, budgets),
                            lambda r: f"≤ {r['flops_budget']:.0e} FLOPs",
                            lambda r: f"{r['train_flops_mean']:.2g} FLOPs, ")


def _best_gold_table(best: pd.DataFrame, column, spent) -> pd.DataFrame:
    """A `frontier._best_within` table as methods (rows) × budgets (columns); `column(row)` names a budget's
    column, `spent(row)` is what the cell says the point cost before its KL ('' for KL budgets)."""
    rows = {}
    for _, r in best.iterrows():
        cell = ("—" if pd.isna(r["gold_mean"]) else
                f"{r['gold_mean']:.3f} [{r['gold_ci_low']:.3f}, {r['gold_ci_high']:.3f}] "
                f"({r['setting']}, step {int(r['step'])}, {spent(r)}KL {r['kl_mean']:.2f})")
        rows.setdefault(r["method_label"], {})[column(r)] = cell
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method").reset_index()


def frontier_display_table(points: pd.DataFrame) -> pd.DataFrame:
    front = fr.pareto_frontier(fr.aggregate_seeds(points))
    if front.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "method": front["method_label"], "setting": front["setting"], "step": front["step"],
        "seeds": front["n_seeds"],
        "KL [95% CI]": [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in
                        zip(front["kl_mean"], front["kl_ci_low"], front["kl_ci_high"])],
        "gold [95% CI]": [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                          zip(front["gold_mean"], front["gold_ci_low"], front["gold_ci_high"])],
        "CI from": front["ci_kind"],
    })


def judge_names(points: pd.DataFrame) -> list[str]:
    return sorted(m.group("name") for c in points.columns if (m := JUDGE_COLUMN.match(c)))


def _ci_cell(rate: object, low: object, high: object) -> str:
    if pd.isna(rate):
        return "—"
    return f"{rate:.3f}" if pd.isna(low) or pd.isna(high) else f"{rate:.3f} [{low:.3f}, {high:.3f}]"


def judge_points_table(points: pd.DataFrame) -> pd.DataFrame:
    """Judge win rates recorded on the runs' final rows: one column per judge, 'rate [low, high]'."""
    names = judge_names(points)
    final = final_rows(points)
    if not names or final.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"run": final["run_id"], "method": fr.method_labels(final).to_numpy()})
    for name in names:
        rate, low, high = (_col(final, f"judge_{name}_{s}") for s in ("win_rate", "ci_low", "ci_high"))
        out[f"{name} win rate [95% CI]"] = [_ci_cell(r, a, b) for r, a, b in zip(rate, low, high)]
    return out


def load_judgements(study_dir: Path) -> pd.DataFrame:
    """`judgements.csv` as written by the judge stage (any columns), numbers rounded for display."""
    path = Path(study_dir) / "judgements.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    table = pd.read_csv(path)
    return table.round(3)


def stage_table(meta: dict) -> pd.DataFrame:
    stages = meta.get("stage_seconds") or {}
    rows = [{"stage": k, "wall time (s)": _num(v, ".1f")} for k, v in stages.items()]
    if meta.get("wall_seconds") is not None:
        rows.append({"stage": "whole study", "wall time (s)": _num(meta["wall_seconds"], ".1f")})
    return pd.DataFrame(rows)


def _agreement_cell(summary: object) -> str:
    """'rate [low, high] (n pairs)' of a pair_labels.agreement_summary dict."""
    if not isinstance(summary, dict) or summary.get("rate") is None:
        return "—"
    cell = _ci_cell(float(summary["rate"]), summary.get("ci_low"), summary.get("ci_high"))
    return f"{cell} ({summary.get('pairs', '?')} pairs)"


def preference_labels_table(study_dir: Path) -> pd.DataFrame:
    """One row per run that trained on pairs relabelled (preferences.labeler) or filtered (preferences.filter):
    the pairs kept and the labeller's agreement with the gold reward, from the run's summary.json."""
    runs = Path(study_dir) / "runs"
    rows = []
    for path in sorted(runs.glob("*/summary.json")) if runs.is_dir() else []:
        labels = _read_json(path, []).get("preference_labels")
        if not isinstance(labels, dict):
            continue
        relabel, kept = (labels.get(k) if isinstance(labels.get(k), dict) else {} for k in ("relabel", "filter"))
        agreement = relabel.get("agreement_with_gold") or {}
        rows.append({
            "run": path.parent.name, "labeler": labels.get("labeler", "—"),
            "pairs labelled → kept": (f"{relabel['pairs_in']} → {relabel['pairs_out']}, {relabel['flipped']} flipped"
                                      if relabel else "—"),
            "agreement with gold [95% CI]": _agreement_cell(agreement.get("all")),
            "clear-cut pairs": _agreement_cell(agreement.get("clear_cut")),
            "RM filter (margin)": (f"{kept['pairs_in']} → {kept['pairs_out']} (> {kept['margin']:g})" if kept else "—"),
            "gold agreement kept / dropped": (f"{_agreement_cell(kept.get('agreement_with_gold_kept'))} / "
                                              f"{_agreement_cell(kept.get('agreement_with_gold_dropped'))}"
                                              if kept else "—"),
        })
    return pd.DataFrame(rows)
