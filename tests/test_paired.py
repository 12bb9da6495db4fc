"""Paired method comparisons at KL budgets (rlhf_lab.eval.paired) against hand-computed float64 values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_lab.eval import frontier as fr
from rlhf_lab.eval import paired
from tests.test_frontier import T_975_DF2, row, table


def test_paired_t_interval_hand_computed():
    diffs = np.array([0.05, 0.02, 0.08])            # mean 0.05, sd 0.03
    mean, low, high = paired.paired_t_interval(diffs)
    half = T_975_DF2 * 0.03 / math.sqrt(3)
    assert mean == pytest.approx(0.05, abs=1e-15)
    assert (low, high) == pytest.approx((0.05 - half, 0.05 + half), abs=1e-12)
    one = paired.paired_t_interval(np.array([0.1]))
    assert one[0] == 0.1 and math.isnan(one[1]) and math.isnan(one[2])


def three_seed_study():
    """DPO (β 0.1) and PPO (kl_coef 0.05) over 3 seeds whose SFT quality differs a lot (seed s adds 0.1·s to
    both): their unpaired intervals overlap, the paired differences (DPO − PPO = 0.05, 0.04, 0.06) exclude 0."""
    rows = []
    for s, d in zip(range(3), [0.05, 0.04, 0.06]):
        base = 0.5 + 0.1 * s
        rows.append(row(method="dpo", beta=0.1, seed=s, step=3, kl=1.0, gold=base + d))
        rows.append(row(method="ppo", loss_type="ppo", kl_coef=0.05, seed=s, step=3, kl=1.5, gold=base))
        rows.append(row(method="ppo", loss_type="ppo", kl_coef=0.05, seed=s, step=6, kl=5.0, gold=base + 0.3))
    return table(*rows)


def test_paired_differences_cancel_what_seeds_share():
    out = paired.paired_comparisons(three_seed_study(), [2.0])
    (r,) = out.to_dict("records")
    half = T_975_DF2 * 0.01 / math.sqrt(3)           # sd of (0.05, 0.04, 0.06) is 0.01
    assert (r["method_a"], r["method_b"], r["n_seeds"]) == ("dpo (sigmoid)", "ppo", 3)
    assert (r["setting_a"], r["step_a"], r["setting_b"], r["step_b"]) == ("β=0.1", 3, "kl_coef=0.05", 3)
    assert (r["diff_mean"], r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx(
        (0.05, 0.05 - half, 0.05 + half), abs=1e-12)
    assert r["verdict"] == "dpo (sigmoid) ahead"
    unpaired = fr.best_at_kl_budgets(three_seed_study(), [2.0]).set_index("method_label")
    assert unpaired.loc["dpo (sigmoid)", "gold_ci_low"] < unpaired.loc["ppo", "gold_ci_high"]   # they overlap
    assert r["sentence"] == (f"at KL ≤ 2: dpo (sigmoid) − ppo = +0.050 [{0.05 - half:+.3f}, {0.05 + half:+.3f}] "
                             "over 3 seeds — dpo (sigmoid) ahead")


def test_each_budget_uses_each_methods_best_point_and_says_when_it_cannot_tell():
    out = paired.paired_comparisons(three_seed_study(), [2.0, 10.0]).set_index("kl_budget")
    wide = out.loc[10.0]
    assert wide["step_b"] == 6 and wide["verdict"] == "ppo ahead"     # PPO's step 6 (KL 5) is within 10
    assert wide["diff_mean"] == pytest.approx(0.05 - 0.3, abs=1e-12)
    noisy = table(row(method="dpo", beta=0.1, seed=0, kl=1.0, gold=0.6), row(method="dpo", beta=0.1, seed=1, kl=1.0,
                                                                          gold=0.5),
                  row(method="ppo", loss_type="ppo", kl_coef=0.05, seed=0, kl=1.0, gold=0.5),
                  row(method="ppo", loss_type="ppo", kl_coef=0.05, seed=1, kl=1.0, gold=0.6))
    (r,) = paired.paired_comparisons(noisy, [2.0]).to_dict("records")
    assert r["diff_mean"] == pytest.approx(0.0, abs=1e-15) and r["verdict"] == "not distinguishable"
    single = paired.paired_comparisons(noisy[noisy["seed"] == 0], [2.0]).iloc[0]
    assert single["verdict"] == "one seed: no interval" and single["sentence"].endswith("over 1 seed — one seed: no interval")
