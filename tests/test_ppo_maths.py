"""Tests for rlhf_lab.algos.ppo.

Expected values are computed here with plain Python loops and ``math`` in float64 from the formulas (Ziegler et
al. 2019 "Fine-tuning language models from human preferences"; Schulman et al. 2016, GAE; TRL's PPOTrainer), never
by calling the function under test; GAE is also cross-checked against a second, independent implementation (discounted sums through a matrix of (γλ)^k).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf_lab.algos.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    ema_update,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from tests.float64 import ATOL, RTOL, assert_close, t  # noqa: F401

NAN = float("nan")



def mask_of(lengths: list[int], steps: int) -> torch.Tensor:
    return t([[1.0 if j < n else 0.0 for j in range(steps)] for n in lengths])



# ---------------------------------------------------------------------------------------------- plain-Python GAE
def gae_row(rewards: list[float], values: list[float], length: int, gamma: float, lam: float):
    """Reverse loop over one row's first ``length`` tokens; V after the last real token is 0."""
    steps = len(rewards)
    adv = [0.0] * steps
    ret = [0.0] * steps
    last = 0.0
    for i in reversed(range(length)):
        next_value = values[i + 1] if i + 1 < length else 0.0
        delta = rewards[i] + gamma * next_value - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
        ret[i] = last + values[i]
    return adv, ret


def random_batch(lengths: list[int], steps: int, seed: int, pad=NAN):
    rng = random.Random(seed)
    rewards = [[rng.gauss(0, 1) if j < n else pad for j in range(steps)] for n in lengths]
    values = [[rng.gauss(0, 1) if j < n else pad for j in range(steps)] for n in lengths]
    return rewards, values


LENGTHS = [7, 5, 1, 3, 0]
STEPS = 7


def test_gae_hand_example():
    # r = [0, 0, 1], V = [0.5, 0.2, 0.4], γ = 1, λ = 0.95
    # δ = [0.2 - 0.5, 0.4 - 0.2, 1 - 0.4] = [-0.3, 0.2, 0.6]; A2 = 0.6, A1 = 0.2 + 0.95·0.6 = 0.77,
    # A0 = -0.3 + 0.95·0.77 = 0.4315; returns = A + V
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]]), t([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.95)
    assert_close(adv, [[0.4315, 0.77, 0.6]])
    assert_close(ret, [[0.9315, 0.97, 1.0]])


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_python_loop_with_padding(gamma, lam):
    rewards, values = random_batch(LENGTHS, STEPS, seed=1)
    adv, ret = gae(t(rewards), t(values), mask_of(LENGTHS, STEPS), gamma=gamma, lam=lam)
    for b, n in enumerate(LENGTHS):
        exp_adv, exp_ret = gae_row(rewards[b], values[b], n, gamma, lam)
        assert_close(adv[b], exp_adv)
        assert_close(ret[b], exp_ret)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()  # nan pads never leak
    assert_close(ret * mask_of(LENGTHS, STEPS), (adv + torch.nan_to_num(t(values))) * mask_of(LENGTHS, STEPS))


def test_gae_padding_does_not_change_real_positions():
    rewards, values = random_batch(LENGTHS, STEPS, seed=2, pad=123.0)
    adv, ret = gae(t(rewards), t(values), mask_of(LENGTHS, STEPS))
    for b, n in enumerate(LENGTHS):
        if n == 0:
            continue
        alone_adv, alone_ret = gae(t([rewards[b][:n]]), t([values[b][:n]]), t([[1.0] * n]))
        assert_close(adv[b, :n], alone_adv[0])
        assert_close(ret[b, :n], alone_ret[0])
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    # other values in the pads: same result
    rewards2, values2 = random_batch(LENGTHS, STEPS, seed=2, pad=-7.5)
    adv2, ret2 = gae(t(rewards2), t(values2), mask_of(LENGTHS, STEPS))
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def gae_by_matrix(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Independent implementation (as cleanrl checks it): A_t = Σ_{k≥t} (γλ)^{k-t} δ_k, via one matrix product."""
    mask = mask.bool()
    v = torch.where(mask, values, torch.zeros_like(values))
    r = torch.where(mask, rewards, torch.zeros_like(rewards))
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    delta = torch.where(mask, r + gamma * next_v - v, torch.zeros_like(v))
    steps = values.shape[1]
    k = torch.arange(steps, dtype=torch.float64)
    power = k[:, None] - k[None, :]  # [k, t] = k - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    adv = delta @ discount
    return adv, torch.where(mask, adv + v, torch.zeros_like(v))


@pytest.mark.parametrize("seed", [3, 4])
def test_gae_matches_matrix_implementation(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = [16, 9, 12, 1, 15, 4]
    steps = 16
    rewards = torch.randn(len(lengths), steps, generator=gen, dtype=torch.float64)
    values = torch.randn(len(lengths), steps, generator=gen, dtype=torch.float64)
    mask = mask_of(lengths, steps)
    for gamma, lam in [(1.0, 0.95), (0.97, 0.9)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        exp_adv, exp_ret = gae_by_matrix(rewards, values, mask, gamma, lam)
        assert_close(adv, exp_adv, rtol=1e-9, atol=1e-11)
        assert_close(ret, exp_ret, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------- token rewards
def test_token_rewards_score_at_last_real_token():
    lengths = [4, 2, 1, 0]
    steps = 4
    scores = [1.0, -2.0, 0.5, 9.0]
    rng = random.Random(5)
    kl = [[rng.gauss(0, 1) if j < n else NAN for j in range(steps)] for n in lengths]
    beta = 0.05
    rewards, non_score = token_rewards(t(scores), t(kl), beta, mask_of(lengths, steps))
    exp_rewards, exp_non_score = [], []
    for b, n in enumerate(lengths):
        row = [-beta * kl[b][j] if j < n else 0.0 for j in range(steps)]
        exp_non_score.append(math.fsum(row))
        if n > 0:
            row[n - 1] += scores[b]  # index mask.sum(-1) - 1
        exp_rewards.append(row)
    assert_close(rewards, exp_rewards)
    assert_close(non_score, exp_non_score)
    # a tensor β gives the same numbers
    rewards_t, _ = token_rewards(
        t(scores), t(kl), torch.tensor(beta, dtype=torch.float64), mask_of(lengths, steps)
    )
    assert_close(rewards_t, exp_rewards)


# ---------------------------------------------------------------------------------------------- KL estimators
def test_kl_estimators_values():
    logp, ref = [-1.0, -2.0, -0.3], [-1.5, -1.2, -0.3]
    k1 = [a - b for a, b in zip(logp, ref)]  # [0.5, -0.8, 0.0]
    assert_close(kl_k1(t(logp), t(ref)), k1)
    assert_close(kl_k2(t(logp), t(ref)), [0.5 * x * x for x in k1])
    assert_close(kl_k3(t(logp), t(ref)), [(math.exp(-x) - 1) + x for x in k1])
    for name, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        assert torch.equal(kl_penalty(t(logp), t(ref), name), fn(t(logp), t(ref)))
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_kl_k3_nonnegative_and_reference_detached():
    gen = torch.Generator().manual_seed(6)
    logp = torch.randn(200, generator=gen, dtype=torch.float64) * 3
    ref = logp + torch.randn(200, generator=gen, dtype=torch.float64) * torch.logspace(
        -12, 1, 200, dtype=torch.float64
    )
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k3(logp, logp) == 0).all()
    logp_g, ref_g = t([-1.0], requires_grad=True), t([-1.5], requires_grad=True)
    kl_k3(logp_g, ref_g).sum().backward()
    assert ref_g.grad is None
    assert_close(logp_g.grad, [1 - math.exp(-0.5)])  # d/dk1 [(e^{-k1} - 1) + k1]


def test_kl_penalty_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(t([0.0]), t([0.0]), "kl")


# ---------------------------------------------------------------------------------------------- masked statistics
def test_masked_mean_and_var():
    x = [[1.0, 2.0, NAN], [4.0, -1.0, 3.0]]
    m = [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    real = [1.0, 2.0, 4.0, 3.0]
    mu = sum(real) / 4
    assert_close(masked_mean(t(x), t(m)), mu)
    assert_close(masked_mean(t(x), t(m), dim=-1), [1.5, 3.5])
    pop = sum((v - mu) ** 2 for v in real) / 4
    assert_close(masked_var(t(x), t(m), unbiased=False), pop)
    assert_close(masked_var(t(x), t(m)), pop * 4 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([1.0, 2.0]), t([1.0, 0.0]))


def test_masked_whiten():
    lengths = [6, 3, 4]
    steps = 6
    rng = random.Random(7)
    x = [[rng.gauss(2.0, 3.0) if j < n else NAN for j in range(steps)] for n in lengths]
    real = [x[b][j] for b, n in enumerate(lengths) for j in range(n)]
    mu = math.fsum(real) / len(real)
    var = math.fsum((v - mu) ** 2 for v in real) / (len(real) - 1)
    mask = mask_of(lengths, steps)
    out = masked_whiten(t(x), mask)
    expected = [
        [(x[b][j] - mu) / math.sqrt(var + 1e-8) if j < n else 0.0 for j in range(steps)]
        for b, n in enumerate(lengths)
    ]
    assert_close(out, expected)
    sel = out[mask.bool()]
    assert abs(sel.mean().item()) < 1e-12
    assert sel.var().item() == pytest.approx(1.0, rel=1e-8)
    assert (out[~mask.bool()] == 0).all()
    # rewards: scale only, the mean is kept
    out_keep = masked_whiten(t(x), mask, shift_mean=False)
    expected_keep = [
        [(x[b][j] - mu) / math.sqrt(var + 1e-8) + mu if j < n else 0.0 for j in range(steps)]
        for b, n in enumerate(lengths)
    ]
    assert_close(out_keep, expected_keep)
    assert out_keep[mask.bool()].mean().item() == pytest.approx(mu, rel=1e-12)


# ---------------------------------------------------------------------------------------------- policy loss
def test_policy_loss_clipped_and_unclipped():
    # tokens: (ratio, A) = (1.5, 2) clipped | (1.1, 2) inside | (0.5, 2) unclipped is the max |
    #         (1.5, -2) unclipped is the max | (0.5, -2) clipped | padding (garbage)
    ratios = [1.5, 1.1, 0.5, 1.5, 0.5, 3.0]
    adv = [2.0, 2.0, 2.0, -2.0, -2.0, 99.0]
    old = [-1.0, -2.0, -0.5, -3.0, -1.2, 1.0]
    new_vals = [o + math.log(r) for o, r in zip(old, ratios)]
    mask = t([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    logp = t([new_vals], requires_grad=True)
    loss, stats = policy_loss(logp, t([old]), t([adv]), mask, cliprange=0.2)
    per_token = [-2.0 * 1.2, -2.0 * 1.1, -2.0 * 0.5, 2.0 * 1.5, 2.0 * 0.8]  # max(-A r, -A clip(r))
    assert per_token == pytest.approx([-2.4, -2.2, -1.0, 3.0, 1.6])
    assert_close(loss, sum(per_token) / 5)
    loss.backward()
    # d/dlogp of -A·r is -A·r on the unclipped branch, 0 on the clipped branch (and on padding)
    assert_close(logp.grad, [[0.0, -2.2 / 5, -1.0 / 5, 3.0 / 5, 0.0, 0.0]])
    assert_close(stats["clipfrac"], 2 / 5)
    log_r = [math.log(r) for r in ratios[:5]]
    assert_close(stats["approxkl"], 0.5 * sum(v * v for v in log_r) / 5)
    r_mean = sum(ratios[:5]) / 5
    assert_close(stats["ratio_mean"], r_mean)
    assert_close(stats["ratio_var"], sum((r - r_mean) ** 2 for r in ratios[:5]) / 5)
    assert all(not s.requires_grad for s in stats.values())


def test_policy_loss_no_clipping_is_plain_surrogate():
    logp = t([[-1.0, -2.0]], requires_grad=True)
    old = t([[-1.05, -1.9]])
    adv = t([[0.7, -1.3]])
    loss, stats = policy_loss(logp, old, adv, t([[1.0, 1.0]]), cliprange=0.2)
    r = [math.exp(0.05), math.exp(-0.1)]
    assert_close(loss, (-0.7 * r[0] + 1.3 * r[1]) / 2)
    assert_close(stats["clipfrac"], 0.0)
    loss.backward()
    assert_close(logp.grad, [[-0.7 * r[0] / 2, 1.3 * r[1] / 2]])


# ---------------------------------------------------------------------------------------------- value loss
def test_value_loss_clipped_and_unclipped():
    # (V, V_old, R): (1.0, 0.5, 2.0) clipped V=0.7 → 1.69 > 1.0 (clipped term wins, no gradient)
    #                (1.0, 0.5, 0.0) clipped 0.49 < 1.0 (unclipped wins)   (0.6, 0.5, 1.0) inside the range
    values = t([[1.0, 1.0, 0.6, 5.0]], requires_grad=True)
    old = t([[0.5, 0.5, 0.5, 0.0]])
    returns = t([[2.0, 0.0, 1.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert_close(loss, 0.5 * (1.69 + 1.0 + 0.16) / 3)
    assert_close(stats["vf_clipfrac"], 1 / 3)
    loss.backward()
    assert_close(values.grad, [[0.0, 0.5 * 2 * (1.0 - 0.0) / 3, 0.5 * 2 * (0.6 - 1.0) / 3, 0.0]])


# ---------------------------------------------------------------------------------------------- entropy
def test_entropy_from_logits():
    assert_close(entropy_from_logits(t([[0.0, 0.0, 0.0, 0.0]])), [math.log(4)])
    logits = [1.0, -0.5, 2.0]
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    expected = -sum(q * math.log(q) for q in p)
    with_inf = t([[1.0, -0.5, float("-inf"), 2.0]])
    assert_close(entropy_from_logits(with_inf), [expected])
    assert entropy_from_logits(torch.zeros(2, 3, 5, dtype=torch.bfloat16)).dtype == torch.float32
    assert entropy_from_logits(torch.zeros(2, 3, 5, dtype=torch.bfloat16)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # 9/6 - 1 = 0.5 → clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000), rel=1e-14)
    ctl.update(torch.tensor(3.0), 512)  # 3/6 - 1 = -0.5 → clipped to -0.2
    v2 = 0.2 * 1.00512 * (1 - 0.2 * 512 / 10000)
    assert ctl.value == pytest.approx(v2, rel=1e-14)
    ctl.update(6.6, 100)  # 6.6/6 - 1 = 0.1, inside the clip
    v3 = v2 * (1 + 0.1 * 100 / 10000)
    assert ctl.value == pytest.approx(v3, rel=1e-12)
    ctl.update(6.0, 1000)  # on target: unchanged
    assert ctl.value == pytest.approx(v3, rel=1e-15)

    state = ctl.state_dict()
    resumed = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for kl, n in [(12.0, 64), (4.5, 64), (5.9, 128)]:
        ctl.update(kl, n)
        resumed.update(kl, n)
        assert resumed.value == ctl.value  # bit-for-bit

    with pytest.raises(ValueError):
        AdaptiveKLController(target=0.0)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_update():
    target = [t([1.0, 2.0], requires_grad=True), t([[0.0]])]
    source = [t([3.0, -2.0]), t([[10.0]])]
    ema_update(target, source, decay=0.9)
    assert_close(target[0], [0.9 * 1.0 + 0.1 * 3.0, 0.9 * 2.0 + 0.1 * -2.0])
    assert_close(target[1], [[1.0]])
    ema_update(target, source, decay=0.0)
    assert_close(target[0], [3.0, -2.0])
    counter = [torch.tensor([1])]
    ema_update(counter, [torch.tensor([5])], decay=0.5)
    assert counter[0].item() == 5
    with pytest.raises(ValueError):
        ema_update(target, source[:1], decay=0.5)
    with pytest.raises(ValueError):
        ema_update(target, source, decay=1.5)
