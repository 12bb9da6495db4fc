"""Tests for rlhf_lab.algos.reward: expected values computed by hand with ``math`` in float64."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf_lab.algos.reward import (
    bradley_terry_loss,
    clip_rewards,
    fit_reward_normalization,
    normalize_rewards,
)
from tests.float64 import ATOL, RTOL, assert_close, logsig, sig, t  # noqa: F401

RC = [1.0, 0.5, -0.2, 2.0]
RR = [0.0, 0.7, -0.2, -1.0]
DIFF = [c - r for c, r in zip(RC, RR)]  # [1.0, -0.2, 0.0, 3.0]


def test_bradley_terry_plain():
    rc = t(RC, requires_grad=True)
    loss, stats = bradley_terry_loss(rc, t(RR))
    assert_close(loss, -sum(logsig(d) for d in DIFF) / 4)
    assert_close(stats["accuracy"], 2 / 4)  # the tie counts as wrong
    assert_close(stats["margin"], sum(DIFF) / 4)
    assert_close(stats["chosen_mean"], sum(RC) / 4)
    assert_close(stats["rejected_mean"], sum(RR) / 4)
    loss.backward()
    assert_close(rc.grad, [-(1 - sig(d)) / 4 for d in DIFF])  # d/dx -logσ(x) = -(1 - σ(x))


def test_bradley_terry_margin_and_centering():
    margin = [0.5, 0.0, 1.0, -0.5]
    loss, stats = bradley_terry_loss(t(RC), t(RR), margin=t(margin))
    assert_close(loss, -sum(logsig(d - m) for d, m in zip(DIFF, margin)) / 4)
    assert_close(stats["margin"], sum(DIFF) / 4)  # the input margin is not subtracted from the logged margin

    c = 0.01
    loss_c, _ = bradley_terry_loss(t(RC), t(RR), margin=0.3, center_rewards_coefficient=c)
    centre = c * sum((a + b) ** 2 for a, b in zip(RC, RR)) / 4  # c·mean([1, 1.44, 0.16, 1])
    assert centre == pytest.approx(0.01 * 3.6 / 4)
    assert_close(loss_c, -sum(logsig(d - 0.3) for d in DIFF) / 4 + centre)

    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(t(RC), t(RR[:3]))


def test_reward_normalization_mean0_std1():
    rng = random.Random(11)
    scores = [rng.gauss(0.7, 0.2) for _ in range(64)]
    gain, bias = fit_reward_normalization(t(scores))
    mu = math.fsum(scores) / len(scores)
    sd = math.sqrt(math.fsum((s - mu) ** 2 for s in scores) / len(scores))
    assert gain == pytest.approx(1 / sd, rel=1e-12)
    assert bias == pytest.approx(-mu / sd, rel=1e-12)
    out = normalize_rewards(t(scores), gain, bias)
    vals = out.tolist()
    m = math.fsum(vals) / len(vals)
    assert abs(m) < 1e-12
    assert math.sqrt(math.fsum((v - m) ** 2 for v in vals) / len(vals)) == pytest.approx(1.0, rel=1e-12)
    # float32 scores: fitted in float64, output keeps float32
    gain32, bias32 = fit_reward_normalization(t(scores).float())
    assert gain32 == pytest.approx(gain, rel=1e-6) and bias32 == pytest.approx(bias, rel=1e-6)
    assert normalize_rewards(t(scores).float(), gain32, bias32).dtype == torch.float32

    with pytest.raises(ValueError):
        fit_reward_normalization(t([0.3, 0.3, 0.3]))
    with pytest.raises(ValueError):
        fit_reward_normalization(t([0.3]))


def test_clip_rewards():
    assert_close(clip_rewards(t([-5.0, -0.5, 0.0, 2.0, 9.0]), 2.0), [-2.0, -0.5, 0.0, 2.0, 2.0])
    x = t([3.0])
    assert clip_rewards(x, None) is x
    with pytest.raises(ValueError):
        clip_rewards(x, 0.0)
