"""Win-rate maths, pure numpy: position debiasing, win rates with ties counted half, bootstrap CIs, a
length-controlled win rate (AlpacaEval 2.0 style) and agreement between judges.

An *outcome* is the policy's result on one pair, seen from the policy's side: 1 = win, 0 = loss, 0.5 = tie,
NaN = invalid (no usable verdict). Arrays of outcomes have shape (num_pairs,).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def orient(winners: Sequence[str], policy_position: str) -> np.ndarray:
    """Positional verdicts ("A"/"B"/"tie"/"invalid") → policy outcomes, the policy shown at `policy_position`."""
    if policy_position not in ("A", "B"):
        raise ValueError(f"policy_position must be 'A' or 'B', got {policy_position!r}")
    table = {policy_position: 1.0, ("B" if policy_position == "A" else "A"): 0.0, "tie": 0.5, "invalid": math.nan}
    return np.array([table[w] for w in winners], dtype=np.float64)


def combine_orders(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Debiased outcome per pair from the two presentation orders: agreement keeps the outcome, disagreement is a
    tie; when one order is invalid the other stands alone; both invalid → invalid."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    out = np.where(first == second, first, 0.5)
    out = np.where(np.isnan(first), second, out)
    return np.where(np.isnan(second), first, out)


def position_bias_rate(first: np.ndarray, second: np.ndarray) -> float:
    """Share of pairs (both orders valid) whose outcome changed when the order was swapped; NaN if none."""
    both = ~np.isnan(first) & ~np.isnan(second)
    return float(np.mean(first[both] != second[both])) if both.any() else math.nan


@dataclass(frozen=True)
class WinRate:
    n: int               # pairs with a usable outcome
    wins: int
    losses: int
    ties: int
    invalid: int         # pairs with no usable outcome (excluded from the rate)
    win_rate: float      # (wins + ties / 2) / n
    ci_low: float        # bootstrap percentile interval
    ci_high: float


def win_rate(outcomes: np.ndarray) -> float:
    """Mean outcome over valid pairs (ties count half); NaN when no pair is valid."""
    valid = outcomes[~np.isnan(outcomes)]
    return float(valid.mean()) if len(valid) else math.nan


def bootstrap_means(outcomes: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Win rates of `n_boot` resamples (with replacement) of the valid pairs: shape (n_boot,)."""
    valid = outcomes[~np.isnan(outcomes)]
    if len(valid) == 0:
        return np.full(n_boot, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(valid), size=(n_boot, len(valid)))
    return valid[idx].mean(axis=1)


def bootstrap_ci(outcomes: np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the win rate."""
    means = bootstrap_means(outcomes, n_boot, seed)
    if np.isnan(means).all():
        return math.nan, math.nan
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(outcomes: np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> WinRate:
    valid = ~np.isnan(outcomes)
    low, high = bootstrap_ci(outcomes, n_boot, alpha, seed)
    return WinRate(int(valid.sum()), int((outcomes == 1).sum()), int((outcomes == 0).sum()),
                   int((outcomes == 0.5).sum()), int((~valid).sum()), win_rate(outcomes), low, high)


def length_controlled_win_rate(outcomes: np.ndarray, len_policy: np.ndarray, len_baseline: np.ndarray,
                               max_iter: int = 100) -> float:
    """AlpacaEval-2-style LC win rate: fit logit P(win) = b0 + b1·tanh(Δlen / sd(Δlen)) on the valid pairs (ties as
    targets of 0.5), and report sigmoid(b0): the win rate predicted when both responses have equal length.

    Falls back to the raw win rate when there is no length variation or every valid outcome is the same."""
    valid = ~np.isnan(outcomes)
    y = outcomes[valid]
    delta = (np.asarray(len_policy, np.float64) - np.asarray(len_baseline, np.float64))[valid]
    if len(y) == 0:
        return math.nan
    sd = delta.std()
    if sd == 0 or np.all(y == y[0]):
        return float(y.mean())
    x = np.stack([np.ones_like(delta), np.tanh(delta / sd)], axis=1)
    beta = _logistic_newton(x, y, max_iter)
    return float(1.0 / (1.0 + math.exp(-beta[0])))


def _logistic_newton(x: np.ndarray, y: np.ndarray, max_iter: int, ridge: float = 1e-9) -> np.ndarray:
    """Maximum-likelihood logistic regression with fractional targets (Newton–Raphson); a vanishing ridge keeps
    the Hessian invertible when the covariate separates the outcomes."""
    beta = np.zeros(x.shape[1])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -30, 30)))
        grad = x.T @ (y - p) - ridge * beta
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.abs(step).max() < 1e-10:
            break
    return beta


def agreement(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(mean of 1 - |x - y|, pairs compared) over pairs valid for both: an exact match scores 1, a tie against a
    preference 0.5 (a tie is a coin flip), opposite preferences 0. Without ties it is the match rate."""
    both = ~np.isnan(x) & ~np.isnan(y)
    if not both.any():
        return math.nan, 0
    return float(np.mean(1.0 - np.abs(x[both] - y[both]))), int(both.sum())
