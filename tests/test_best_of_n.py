"""Best-of-N maths (rlhf_lab.algos.best_of_n) against hand-computed values and brute-force subset enumeration."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlhf_lab.algos.best_of_n import best_of_n_weights, expected_best_of_n, kl_bound


def test_kl_bound_closed_form():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert kl_bound(4) == pytest.approx(1.3862943611198906 - 0.75, abs=1e-15)
    with pytest.raises(ValueError, match="n >= 1"):
        kl_bound(0)


def test_weights_hand_computed():
    np.testing.assert_allclose(best_of_n_weights(4, 2), [0, 1 / 6, 2 / 6, 3 / 6], rtol=0, atol=1e-15)
    np.testing.assert_allclose(best_of_n_weights(4, 1), [0.25] * 4, rtol=0, atol=1e-15)
    np.testing.assert_allclose(best_of_n_weights(4, 4), [0, 0, 0, 1], rtol=0, atol=1e-15)
    assert best_of_n_weights(128, 16).sum() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="1 <= n <= K = 4"):
        best_of_n_weights(4, 5)


def brute_force(scores: np.ndarray, gold: np.ndarray, n: int) -> float:
    """Mean gold of the first-argmax sample over every n-subset of one prompt's samples."""
    picks = [gold[list(s)][int(np.argmax(scores[list(s)]))] for s in itertools.combinations(range(len(scores)), n)]
    return float(np.mean(picks))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_equals_the_mean_over_every_subset_including_ties(n):
    scores = np.array([[0.3, 0.9, 0.1, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])   # ties, and an all-tied prompt
    gold = np.array([[0.2, 0.8, 0.0, 0.6, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5]])
    got = expected_best_of_n(scores, gold, n)
    for p in range(2):
        assert got[p] == pytest.approx(brute_force(scores[p], gold[p], n), abs=1e-12)
    # all tied: each subset's earliest sample wins; by hand, Σ_i gold_i · C(4 − i, n − 1) / C(5, n)
    assert got[1] == pytest.approx({1: 0.3, 2: 0.2, 3: 0.15, 5: 0.1}[n], abs=1e-12)


def test_non_finite_prompts_are_nan_not_ranked():
    got = expected_best_of_n(np.array([[0.1, np.nan], [0.2, 0.1]]), np.array([[1.0, 0.0], [0.5, np.inf]]), 2)
    assert np.isnan(got).all()
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        expected_best_of_n(np.zeros(3), np.zeros(3), 1)
