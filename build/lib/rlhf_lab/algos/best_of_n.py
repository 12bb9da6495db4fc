"""Best-of-N maths, as pure functions: the yardstick on the reward–KL frontier.

Best-of-N samples N completions from the reference (SFT) policy, keeps the one a scorer (the gold reward, or the
learned reward model) ranks highest, and reports its gold reward. It needs no training, and with the gold reward
as scorer it is close to the best trade-off reachable at its KL, so a trained method's gap to it says how well
that method optimised.

KL: `kl_bound(n) = log n − (n − 1)/n` nats, the closed form used since Stiennon et al. 2020 (appendix G.3). Beirami
et al. 2024 ("Theoretical guarantees on the best-of-n alignment policy") prove it is an upper bound on
KL(π_BoN ‖ π_ref), tight only when the scores have no ties; plots must say "upper bound".

Gold reward for every n ≤ K from one set of K samples per prompt (Nakano et al. 2021, appendix; Gao et al. 2023,
"Scaling laws for reward model overoptimization", §2): sort a prompt's K samples by score ascending; a uniformly
random n-subset has its best at rank i (1-based) with probability C(i − 1, n − 1) / C(K, n), so

    E[gold of best-of-n] = Σ_i C(i − 1, n − 1) / C(K, n) · gold_(i)

is an unbiased estimate, without drawing subsets, that uses all K samples for every n.

Shapes: P prompts, K samples per prompt.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["best_of_n_weights", "expected_best_of_n", "kl_bound"]


def kl_bound(n: int) -> float:
    """log n − (n − 1)/n: an upper bound on KL(π_BoN ‖ π_ref) in nats (0 at n = 1)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(k: int, n: int) -> np.ndarray:
    """(K,) probability that the sample of ascending score rank i (0-based) is the best of a uniformly random
    n-subset of the K samples: C(i, n − 1) / C(K, n). Sums to 1; zero below rank n − 1."""
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs 1 <= n <= K = {k} samples per prompt")
    total = math.comb(k, n)
    return np.array([math.comb(i, n - 1) / total for i in range(k)], dtype=np.float64)


def expected_best_of_n(scores: np.ndarray, gold: np.ndarray, n: int) -> np.ndarray:
    """(P,) unbiased estimate of the gold reward of best-of-n per prompt, from (P, K) scores and gold rewards.

    Among equal scores the earlier sample ranks higher, which is what taking the first maximum of a subset
    (argmax) does. A prompt with a non-finite score or gold is NaN (the caller counts and drops it) rather than
    silently ranked."""
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if scores.shape != gold.shape or scores.ndim != 2:
        raise ValueError(f"scores and gold must both be (P, K), got {scores.shape} and {gold.shape}")
    bad = ~(np.isfinite(scores).all(axis=1) & np.isfinite(gold).all(axis=1))      # (P,)
    scores, gold = np.where(bad[:, None], 0.0, scores), np.where(bad[:, None], 0.0, gold)
    later_first = np.broadcast_to(-np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((later_first, scores), axis=1)                              # score ascending, then index desc
    ranked_gold = np.take_along_axis(gold, order, axis=1)                         # (P, K) by ascending score
    out = ranked_gold @ best_of_n_weights(scores.shape[1], n)                      # (P,)
    out[bad] = np.nan
    return out
