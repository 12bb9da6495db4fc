"""Paired comparisons of methods at KL budgets: the sentence a reader can quote.

At each KL budget every method contributes its best point (`frontier.best_at_kl_budgets`: a setting and a step).
Two methods are then compared seed by seed: seed s of either arm starts from the same SFT model and is evaluated
on the same held-out prompts, so the per-seed difference of their gold rewards cancels what the seeds share (the
SFT model's quality, the prompt draw), and a t-interval over those differences is narrower than comparing the two
unpaired intervals (Student's paired t-test). With one common seed there is no interval; the sentence says so.

    at KL ≤ 2: dpo (sigmoid) − ppo = +0.030 [−0.010, +0.070] over 3 seeds — not distinguishable

Caveat, stated in the report: each method's point is the best of several settings chosen on the same seeds, so the
difference is optimistic for whichever method had more settings to choose from (selection is not corrected for).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from rlhf_lab.eval import frontier as fr

PAIRED_COLUMNS = [
    "kl_budget", "method_a", "method_b", "setting_a", "step_a", "setting_b", "step_b", "n_seeds",
    "diff_mean", "diff_ci_low", "diff_ci_high", "verdict", "sentence",
]


def paired_t_interval(diffs: np.ndarray, level: float = fr.CI_LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed differences: mean ± t_{n−1} · sd / √n; NaN bounds with fewer than 2 seeds."""
    diffs = np.asarray(diffs, dtype=float)
    n = len(diffs)
    mean = float(diffs.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, method_a: str, method_b: str) -> str:
    if math.isnan(low) or math.isnan(high):
        return "one seed: no interval"
    if low > 0:
        return f"{method_a} ahead"
    if high < 0:
        return f"{method_b} ahead"
    return "not distinguishable"


def per_seed_gold(labelled: pd.DataFrame, label: str, setting: str, step: int) -> pd.Series:
    """Gold reward of one method's (setting, step) indexed by seed (`labelled`: `frontier.with_labels` output)."""
    rows = labelled[(labelled["method_label"] == label) & (labelled["setting"] == setting)
                    & (labelled["step"] == step)]
    return rows.groupby("seed")["gold_reward_mean"].mean()


def paired_comparisons(points: pd.DataFrame, budgets: Sequence[float]) -> pd.DataFrame:
    """Every pair of methods at every KL budget where both have a point (`PAIRED_COLUMNS`)."""
    best = fr.best_at_kl_budgets(points, budgets).dropna(subset=["gold_mean"])
    labelled = fr.with_labels(points)
    rows = []
    for budget, at_budget in best.groupby("kl_budget", sort=True):
        entries = at_budget.sort_values("method_label").to_dict("records")
        for a, b in itertools.combinations(entries, 2):
            gold_a = per_seed_gold(labelled, a["method_label"], a["setting"], int(a["step"]))
            gold_b = per_seed_gold(labelled, b["method_label"], b["setting"], int(b["step"]))
            common = gold_a.index.intersection(gold_b.index)
            mean, low, high = paired_t_interval((gold_a[common] - gold_b[common]).to_numpy())
            said = verdict(low, high, a["method_label"], b["method_label"])
            rows.append({
                "kl_budget": float(budget), "method_a": a["method_label"], "method_b": b["method_label"],
                "setting_a": a["setting"], "step_a": int(a["step"]), "setting_b": b["setting"],
                "step_b": int(b["step"]), "n_seeds": len(common), "diff_mean": mean, "diff_ci_low": low,
                "diff_ci_high": high, "verdict": said,
                "sentence": sentence(float(budget), a["method_label"], b["method_label"], mean, low, high,
                                     len(common), said),
            })
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def sentence(budget: float, method_a: str, method_b: str, mean: float, low: float, high: float, n: int,
             said: str) -> str:
    interval = "" if math.isnan(low) else f" [{low:+.3f}, {high:+.3f}]"
    seeds = f"{n} seed" + ("s" if n != 1 else "")
    return f"at KL ≤ {budget:g}: {method_a} − {method_b} = {mean:+.3f}{interval} over {seeds} — {said}"
