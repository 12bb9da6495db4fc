"""RLOO and GRPO maths (rlhf_lab/algos/critic_free.py) against values computed by hand in plain Python floats."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_lab.algos.critic_free import grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from tests.float64 import assert_close, t


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # group 1: 1 − (2+4)/2, 2 − (1+4)/2, 4 − (1+2)/2; group 2: 0 − 3/2, 0 − 3/2, 3 − 0
    assert_close(rloo_advantages(t([1, 2, 4, 0, 0, 3]), k=3), [-2.0, -0.5, 2.5, -1.5, -1.5, 3.0])


def test_rloo_leaves_invalid_episodes_out_of_the_baseline():
    valid = torch.tensor([True, True, False, True, False, False])
    # group 1 has two valid members: 1 − 2, 2 − 1, and the invalid one gets 0; group 2 has one: no baseline
    assert_close(rloo_advantages(t([1, 2, 99, 5, 7, 8]), k=3, valid=valid), [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0])


def test_grpo_advantages_are_group_normalised_with_bessel_std():
    scores = [1.0, 2.0, 4.0]
    mean = sum(scores) / 3
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / 2)
    expected = [(s - mean) / (std + 1e-4) for s in scores]
    expected += [0.0, 0.0]      # a group of equal scores has no signal (std 0 → 0 / eps)
    out = torch.cat([grpo_advantages(t(scores), k=3), grpo_advantages(t([3.0, 3.0]), k=2)])
    assert_close(out, expected)
    assert_close(grpo_advantages(t(scores), k=3, scale=False), [s - mean for s in scores])


def test_grpo_invalid_member_is_excluded():
    valid = torch.tensor([True, False, True])
    # the valid members 1 and 5: mean 3, Bessel std sqrt(8/1)
    std = math.sqrt(((1 - 3) ** 2 + (5 - 3) ** 2) / 1)
    assert_close(grpo_advantages(t([1, 100, 5]), k=3, valid=valid), [-2 / (std + 1e-4), 0.0, 2 / (std + 1e-4)])


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="whole groups of 4"):
        rloo_advantages(t([1, 2, 3]), k=4)


LOGP = [[-1.0, -2.0], [-0.5, -3.0]]
OLD = [[-1.2, -1.9], [-0.4, -0.1]]
MASK = [[1.0, 1.0], [1.0, 0.0]]     # the second sequence has one real token


def _clipped_term(a: float, ratio: float, eps: float) -> float:
    return max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))


def test_rloo_loss_clips_the_sequence_ratio():
    adv, eps = [1.5, -2.0], 0.2
    ratios = [math.exp((-1.0 + 1.2) + (-2.0 + 1.9)), math.exp(-0.5 + 0.4)]   # masked token excluded
    expected = sum(_clipped_term(a, r, eps) for a, r in zip(adv, ratios)) / 2
    loss, stats = rloo_loss(t(LOGP, requires_grad=True), t(OLD), t(adv), t(MASK), eps)
    assert_close(loss, expected)
    assert_close(stats["ratio_mean"], sum(ratios) / 2)


def test_rloo_loss_on_policy_is_reinforce_with_the_baseline():
    """At ρ = 1 the gradient is −A_i / B on every real token of sequence i (REINFORCE), 0 on padding."""
    logp = t(LOGP, requires_grad=True)
    loss, _ = rloo_loss(logp, t(LOGP), t([1.5, -2.0]), t(MASK), 0.2)
    loss.backward()
    assert_close(logp.grad, [[-0.75, -0.75], [1.0, 0.0]])


def test_grpo_loss_matches_hand_computation():
    ref = [[-1.1, -2.5], [-0.7, -0.2]]
    adv, eps, beta = [0.8, -1.3], 0.2, 0.04
    per_seq = []
    for i in range(2):
        terms = []
        for j in range(2):
            if MASK[i][j] == 0:
                continue
            ratio = math.exp(LOGP[i][j] - OLD[i][j])
            k3 = math.exp(ref[i][j] - LOGP[i][j]) - (ref[i][j] - LOGP[i][j]) - 1
            terms.append(_clipped_term(adv[i], ratio, eps) + beta * k3)
        per_seq.append(sum(terms) / len(terms))
    loss, stats = grpo_loss(t(LOGP, requires_grad=True), t(OLD), t(ref), t(adv), t(MASK), eps, beta)
    assert_close(loss, sum(per_seq) / 2)
    assert stats["kl_k3"] >= 0


def test_grpo_kl_term_pulls_towards_the_reference():
    """With zero advantages only β·k3 remains; its gradient in log π is β·(1 − π_ref/π) / |y| / B."""
    logp, ref = t([[-1.0]], requires_grad=True), [[-2.0]]
    loss, _ = grpo_loss(logp, t([[-1.0]]), t(ref), t([0.0]), t([[1.0]]), 0.2, beta=0.5)
    loss.backward()
    assert_close(logp.grad, [[0.5 * (1 - math.exp(-2.0 + 1.0))]])
