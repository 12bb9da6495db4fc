"""Gao et al. 2023's over-optimisation forms: exact recovery of (α, β) from points on the curve, the peak in closed
form against a dense grid, and the per-method fits over a points table."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rlhf_lab.eval.overoptimisation import fit_gao, overoptimisation_fits


@pytest.mark.parametrize("form, alpha, beta", [("rl", 0.30, 0.12), ("bon", 0.25, 0.05)])
def test_fit_recovers_the_curve_and_its_peak(form, alpha, beta):
    kl = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    d = np.sqrt(kl)
    gain = d * (alpha - beta * (np.log(d) if form == "rl" else d))
    fit = fit_gao(kl, gain, form)
    assert (fit.alpha, fit.beta) == pytest.approx((alpha, beta), abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.points == 6
    grid = np.linspace(1e-6, 50.0, 2_000_001)                 # d from 0 to 50: the maximum, found by brute force
    values = grid * (alpha - beta * (np.log(grid) if form == "rl" else grid))
    best = int(values.argmax())
    assert math.sqrt(fit.peak_kl) == pytest.approx(grid[best], abs=1e-4)
    assert fit.peak_gain == pytest.approx(values[best], abs=1e-9)


def test_fit_needs_two_points_with_positive_kl():
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_gao([0.0, 1.0], [0.0, 0.1])


def test_fits_over_a_points_table_use_each_runs_own_baseline():
    rows = []
    for run, base in (("a", 0.40), ("b", 0.50)):
        rows.append({"run_id": run, "method": "ppo", "loss_type": "ppo", "step": 0, "kl_mean": 0.0,
                     "gold_reward_mean": base})
        for step, kl in ((1, 1.0), (2, 4.0), (3, 9.0)):
            d = math.sqrt(kl)
            rows.append({"run_id": run, "method": "ppo", "loss_type": "ppo", "step": step, "kl_mean": kl,
                         "gold_reward_mean": base + d * (0.2 - 0.1 * math.log(d))})
    rows.append({"run_id": "c", "method": "ppo_gt", "loss_type": "ppo", "step": 1, "kl_mean": 1.0,
                 "gold_reward_mean": 0.9})
    fits = overoptimisation_fits(pd.DataFrame(rows))
    assert list(fits["method"]) == ["ppo"]                          # PPO-GT optimises gold itself: not fitted
    assert (fits["alpha"][0], fits["beta"][0]) == pytest.approx((0.2, 0.1), abs=1e-12)
