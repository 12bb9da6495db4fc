"""Has each run reached its plateau? A frontier drawn from runs that were still improving compares budgets, not
methods, so the study flags every run whose last two evaluations still differ by more than their noise.

For run r with gold means g₁ (second-to-last evaluation) and g₂ (last), each with its within-run standard error,
the difference Δ = g₂ − g₁ has standard error √(se₁² + se₂²) (independent evaluation samples: each evaluation
draws its own completions). |Δ| > that SE — a deliberately sensitive one-SE rule, since the cost of a false alarm
is a longer run and the cost of a miss is a wrong verdict — marks the run "still rising" or "still falling".
Best-of-n runs are left out: their steps are n, not training, and their gold rises with n by construction.
"""
from __future__ import annotations

import math

import pandas as pd

from rlhf_lab.eval import frontier as fr

CONVERGENCE_COLUMNS = ["run_id", "method_label", "setting", "step_prev", "step_last", "gold_prev", "gold_last",
                       "diff", "diff_se", "state"]


def last_two_evaluations(points: pd.DataFrame) -> pd.DataFrame:
    """One row per trained run with at least two evaluations after step 0 (`CONVERGENCE_COLUMNS`)."""
    labelled = fr.with_labels(points)
    trained = labelled[(labelled["step"] > 0) & (labelled["method"] != "best_of_n")]
    rows = []
    for run_id, g in trained.groupby("run_id", sort=True):
        g = g.sort_values("step")
        if len(g) < 2:
            continue
        prev, last = g.iloc[-2], g.iloc[-1]
        diff = float(last["gold_reward_mean"] - prev["gold_reward_mean"])
        diff_se = math.hypot(float(prev["gold_reward_se"]), float(last["gold_reward_se"]))
        state = ("still rising" if diff > diff_se else "still falling" if diff < -diff_se else "plateau")
        rows.append({"run_id": run_id, "method_label": last["method_label"], "setting": last["setting"],
                     "step_prev": int(prev["step"]), "step_last": int(last["step"]),
                     "gold_prev": float(prev["gold_reward_mean"]), "gold_last": float(last["gold_reward_mean"]),
                     "diff": diff, "diff_se": diff_se, "state": state})
    return pd.DataFrame(rows, columns=CONVERGENCE_COLUMNS)


def convergence_warnings(points: pd.DataFrame) -> list[str]:
    """One sentence per run that had not reached its plateau by its last evaluation."""
    table = last_two_evaluations(points)
    return [f"{r.run_id}: gold {r.gold_prev:.3f} → {r.gold_last:.3f} between steps {r.step_prev} and {r.step_last} "
            f"(Δ {r.diff:+.3f}, SE {r.diff_se:.3f}): {r.state}; train longer before reading its place on the frontier"
            for r in table.itertuples() if r.state != "plateau"]
