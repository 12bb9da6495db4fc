"""Win-rate maths against values worked out by hand (judges/winrate.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_lab.judges.winrate import (
    agreement,
    bootstrap_ci,
    bootstrap_means,
    combine_orders,
    length_controlled_win_rate,
    orient,
    position_bias_rate,
    summarize,
    win_rate,
)

nan = math.nan


def test_orient_maps_positions_to_policy_outcomes():
    winners = ["A", "B", "tie", "invalid"]
    np.testing.assert_array_equal(orient(winners, "A"), [1.0, 0.0, 0.5, nan])
    np.testing.assert_array_equal(orient(winners, "B"), [0.0, 1.0, 0.5, nan])
    with pytest.raises(ValueError):
        orient(winners, "C")


def test_combine_orders_disagreement_is_a_tie_and_one_invalid_order_stands_alone():
    first = np.array([1, 1, 0, 1, nan, nan, 0.5])
    second = np.array([1, 0, 0, 0.5, 1, nan, 0.5])
    np.testing.assert_array_equal(combine_orders(first, second), [1, 0.5, 0, 0.5, 1, nan, 0.5])
    # pairs 0, 1, 2, 3, 6 have both orders; 1 and 3 changed with the order
    assert position_bias_rate(first, second) == pytest.approx(2 / 5)
    assert math.isnan(position_bias_rate(np.array([nan]), np.array([1.0])))


def test_summary_counts_ties_half_and_excludes_invalid():
    s = summarize(np.array([1, 1, 0, 0.5, nan]), n_boot=200)
    assert (s.n, s.wins, s.losses, s.ties, s.invalid) == (4, 2, 1, 1, 1)
    assert s.win_rate == pytest.approx(2.5 / 4)
    assert s.ci_low <= s.win_rate <= s.ci_high
    assert math.isnan(win_rate(np.array([nan, nan])))


def test_bootstrap_of_two_pairs_matches_the_binomial_resampling_distribution():
    # resampling [1, 0] twice gives mean 0 / 0.5 / 1 with probabilities 1/4, 1/2, 1/4
    means = bootstrap_means(np.array([1.0, 0.0]), n_boot=40_000, seed=3)
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.01)
    assert np.mean(means == 0.0) == pytest.approx(0.25, abs=0.01)


def test_bootstrap_ci_width_matches_the_normal_approximation():
    outcomes = np.array([1.0, 0.0] * 50)   # p = 0.5, n = 100: SE = sqrt(0.25 / 100) = 0.05
    low, high = bootstrap_ci(outcomes, n_boot=20_000, seed=0)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.015)
    assert high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.015)
    assert bootstrap_ci(np.ones(10), n_boot=100) == (1.0, 1.0)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # longer policy responses (Δ = +2): 8 pairs winning 3/4; shorter ones (Δ = -2): 4 pairs winning 1/4.
    # Two groups, two parameters: the fit is exact, logit(3/4) = b0 + b1·t and logit(1/4) = b0 - b1·t, so b0 = 0.
    outcomes = np.array([1] * 6 + [0] * 2 + [1] + [0] * 3, dtype=float)
    len_policy = np.array([12] * 8 + [8] * 4)
    len_base = np.full(12, 10)
    assert win_rate(outcomes) == pytest.approx(7 / 12)
    assert length_controlled_win_rate(outcomes, len_policy, len_base) == pytest.approx(0.5, abs=1e-6)


def test_length_controlled_win_rate_keeps_a_real_advantage():
    # Δ = +2 wins 3/4, Δ = -2 wins 1/2: b0 + b1·t = ln 3, b0 - b1·t = 0  →  LC = sigmoid(ln(3) / 2) = √3 / (1 + √3)
    outcomes = np.array([1] * 6 + [0] * 2 + [1, 1, 0, 0], dtype=float)
    lc = length_controlled_win_rate(outcomes, np.array([12] * 8 + [8] * 4), np.full(12, 10))
    assert lc == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-6)


def test_length_controlled_equals_raw_without_length_variation_and_ignores_invalid():
    outcomes = np.array([1, 0.5, 0, 1, nan])
    lengths = np.array([5, 5, 5, 5, 99])
    assert length_controlled_win_rate(outcomes, lengths, np.full(5, 5)) == pytest.approx(2.5 / 4)
    assert length_controlled_win_rate(np.ones(4), np.arange(4), np.zeros(4)) == 1.0


def test_agreement_scores_ties_as_coin_flips():
    x = np.array([1, 0, 0.5, 1, nan])
    y = np.array([1, 1, 1, 0.5, 0])
    value, n = agreement(x, y)
    assert n == 4
    assert value == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    value, n = agreement(np.array([nan]), np.array([1.0]))
    assert math.isnan(value) and n == 0
