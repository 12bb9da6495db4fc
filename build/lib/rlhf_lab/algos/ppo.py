"""PPO for language models (RLHF), as pure torch functions: the maths of TRL's PPO trainer, one function a step.

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (per-token KL penalty,
adaptive KL controller, reward normalisation), Huang et al. 2024 ("The N implementation details of RLHF with PPO"),
Xu et al. 2024 ("Is DPO superior to PPO?", EMA reference) and TRL's ``PPOTrainer`` (TRL <= 0.28, the last release
with it; its code is the reference for every number here). See Huang et al. 2024, "The N+ implementation details of RLHF with PPO".

Shapes and masks
----------------
``B`` = number of sequences, ``T`` = number of **response** tokens (the prompt is not part of any tensor here).
Per-token tensors are ``(B, T)``; ``mask`` is float, 1.0 on real response tokens and 0.0 on padding. Responses
are **right-padded**: the real tokens of a row are a prefix ``0 .. L-1`` with ``L = mask.sum(-1)``, its last real
token is ``L-1`` (after truncation at the first EOS, detail 4). Whatever pad positions hold (garbage values,
``INVALID_LOGPROB``, even inf/nan) is ignored: every masked reduction selects the real positions with
``torch.where`` instead of multiplying, and per-token outputs are 0 on padding.

A PPO step, as TRL orders it::

    kl = kl_penalty(logp_rollout, ref_logp, "k1")                     # (B, T)
    rewards, non_score = token_rewards(scores, kl, kl_ctl.value, mask)   # (B, T), (B,)
    adv, returns = gae(rewards, values_rollout, mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask)                                       # always (detail 6)
    # for each PPO epoch / minibatch:
    pg_loss, pg_stats = policy_loss(logp_new, logp_rollout, adv, mask, cliprange=0.2)
    vf_loss, vf_stats = value_loss(v_new, values_rollout, returns, mask, cliprange_value=0.2)
    loss = pg_loss + vf_coef * vf_loss
    kl_ctl.update(mean_sequence_kl, n_steps=batch_size)                 # once per rollout batch

Every function is pure (no state, no logging, no I/O) except :meth:`AdaptiveKLController.update` (the controller's
own state) and :func:`ema_update` (which updates its target tensors in place by design).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from typing import Callable

import torch

Tensor = torch.Tensor

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "ema_update",
    "entropy_from_logits",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_rewards",
    "value_loss",
]


# --------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` on real positions, exactly 0 on padding (even where ``x`` is inf/nan there)."""
    mask = mask.to(x.dtype)
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1: ``Σ x·m / Σ m``.

    ``x``, ``mask``: same shape. ``dim=None`` gives a scalar over all real positions; ``dim=d`` reduces that
    dimension only (e.g. ``dim=-1``: ``(B, T) -> (B,)`` per-sequence means). A reduction with no real position
    gives nan (0/0), as TRL; no check is made, to avoid a device sync.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return _select(x, mask).sum() / mask.sum()
    return _select(x, mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all real positions (scalar), as TRL's ``masked_var``.

    ``masked_mean((x - μ)², mask)``, times the Bessel correction ``n/(n-1)`` (n = Σ mask) when ``unbiased``.
    Raises ``ValueError`` when ``unbiased`` and n < 2 (the correction would divide by zero); this reads ``n``
    back from the device, once.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = float(mask.sum())
        if n < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 real positions, got {n:g}; "
                "use a larger (mini)batch or unbiased=False"
            )
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Whiten ``x`` over its real positions (PPO detail 6): ``(x - μ) / sqrt(σ² + eps)``, μ and σ² (unbiased)
    taken over the real positions of the whole batch (TRL's ``masked_whiten``).

    ``shift_mean=True`` (advantages) leaves mean 0 and variance ≈ 1 on the real positions; ``shift_mean=False``
    (reward whitening) adds μ back, so only the scale changes: ``(x - μ)/σ + μ``. Shape of ``x`` in and out; pad
    positions of the output are 0 (TRL fills them with 0 right after whitening, for advantages and rewards alike).

    ``reduce_sum`` sums a tensor over the data-parallel ranks (the caller's all-reduce): μ and σ² are then those
    of the *global* batch, so every rank whitens with the same statistics, as one process holding all rows would.
    Two reductions (Σ m·x and Σ m, then Σ m·(x − μ)²) keep the variance as accurate as ``masked_var``'s.
    """
    if reduce_sum is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        m = mask.to(x.dtype)
        sums = reduce_sum(torch.stack([_select(x, m).sum(), m.sum()]))
        mean, n = sums[0] / sums[1], float(sums[1])
        if n < 2:
            raise ValueError(f"masked_whiten needs at least 2 real positions over all ranks, got {n:g}")
        var = reduce_sum(_select((x - mean) ** 2, m).sum()) / n * (n / (n - 1))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)


# --------------------------------------------------------------------------------------------------------------
# KL estimators and the per-token reward (details 4-5)
# --------------------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log π(y_t) - log π_ref(y_t): unbiased per-token estimate of KL(π‖π_ref) on samples from π, can be < 0.

    ``logp``, ``ref_logp``: ``(B, T)`` log-probs of the sampled tokens; the reference is detached. Out ``(B, T)``.
    """
    return logp - ref_logp.detach()


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½·k1² (Schulman, "Approximating KL divergence", 2020): ≥ 0, biased, low variance. ``(B, T)``."""
    return 0.5 * kl_k1(logp, ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (e^{-k1} - 1) + k1 = (r - 1) - log r with r = π_ref/π (Schulman 2020); unbiased and ≥ 0. ``(B, T)``.

    TRL writes ``logr = ref_logp - logp; (logr.exp() - 1) - logr``, the same number; we use ``expm1`` for
    precision near k1 = 0 (where the two ``exp - 1`` forms differ by rounding only).
    """
    k1 = kl_k1(logp, ref_logp)
    return torch.expm1(-k1) + k1


_KL_FUNCTIONS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate by name (TRL ``kl_estimator``; TRL offers "k1" and "k3"). ``(B, T)`` in and out.

    Raises ``ValueError`` listing the valid names for an unknown ``estimator``.
    """
    fn = _KL_FUNCTIONS.get(estimator)
    if fn is None:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return fn(logp, ref_logp)


def token_rewards(scores: Tensor, kl: Tensor, kl_coef: float | Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token reward of Ziegler et al. 2019 (PPO detail 5): ``r_t = -β·kl_t`` on real tokens, plus the
    sequence score at the last real token.

    ``scores``: ``(B,)`` reward-model (or gold) score of each response; ``kl``: ``(B, T)`` per-token KL estimate;
    ``kl_coef``: β; ``mask``: ``(B, T)``.
    Returns ``rewards`` ``(B, T)`` (0 on padding) and ``non_score_reward`` ``(B,)`` = Σ_t -β·kl_t over real tokens
    (TRL's ``objective/non_score_reward`` is its batch mean; ``objective/rlhf_reward`` = mean(scores + it)).

    The score goes to the last real token, index ``mask.sum(-1) - 1`` for right-padded rows (computed as the
    largest index with mask 1). TRL's PPOTrainer adds it one position later (``sequence_lengths + 1`` when that
    is < T), a known quirk; we follow the paper. A row with no real token gets no score
    (its rewards are all 0 and every masked loss ignores it).
    """
    kl_coef_t = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device)
    per_token = _select(-kl_coef_t * kl, mask)
    non_score_reward = per_token.sum(dim=-1)
    real = mask != 0
    positions = torch.arange(kl.shape[-1], device=kl.device)
    last = torch.where(real, positions, torch.full_like(positions, -1)).amax(dim=-1)  # (B,), -1 if empty
    has_token = last >= 0
    score = torch.where(has_token, scores.to(kl.dtype), torch.zeros((), dtype=kl.dtype, device=kl.device))
    rewards = per_token.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), score.unsqueeze(-1))
    return rewards, non_score_reward


# --------------------------------------------------------------------------------------------------------------
# Generalised advantage estimation (detail 7)
# --------------------------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016, over the response tokens:

    ``δ_t = r_t + γ·V_{t+1} - V_t``,  ``A_t = δ_t + γλ·A_{t+1}``,  ``returns_t = A_t + V_t``.

    ``rewards``, ``values``, ``mask``: ``(B, T)``; returns ``(advantages, returns)``, both ``(B, T)``.
    Vectorised over the batch, one reverse loop over T.

    Masking (right-padded rows): values and rewards on pad positions are ignored (replaced by 0), so the
    value after the last real token is V_{L} = 0 (the episode ends there: the last step bootstraps from nothing)
    and A_{L} = 0. Advantages and returns are 0 on padding, and a row's real positions get exactly the
    advantages that row would get alone, without padding. Mechanically ``A_t = (δ_t + γλ·A_{t+1})·m_t``, with
    V and r zeroed where m = 0: a 0 inside a row would therefore act as an episode end, which is why rows must be
    right-padded. TRL computes the same recursion (it zeroes pad values beforehand and the pad advantages after).

    No detaching here: advantages and returns are targets, so call it under ``torch.no_grad()`` (as TRL does)
    or pass detached rollout values.
    """
    mask = mask.to(values.dtype)
    values = _select(values, mask)
    rewards = _select(rewards.to(values.dtype), mask)
    steps = values.shape[-1]
    next_value = torch.zeros_like(values[..., 0])
    last_adv = torch.zeros_like(values[..., 0])
    reversed_advantages = []
    for t in reversed(range(steps)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        last_adv = (delta + gamma * lam * last_adv) * mask[..., t]
        reversed_advantages.append(last_adv)
        next_value = values[..., t]
    if reversed_advantages:
        advantages = torch.stack(reversed_advantages[::-1], dim=-1)
    else:
        advantages = torch.zeros_like(values)
    returns = advantages + values
    return advantages, returns


# --------------------------------------------------------------------------------------------------------------
# Losses (detail 8)
# --------------------------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cliprange: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, Schulman et al. 2017, eq. 7, as a loss over real tokens:

    ``ratio = exp(logp - old_logp)``,  ``loss = masked_mean(max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)))``.

    ``logp``: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad); ``old_logp``:
    ``(B, T)`` the same at rollout time; ``advantages``: ``(B, T)`` (whitened). ``old_logp`` and ``advantages``
    are detached. Returns a scalar loss and detached scalar stats:

    * ``approxkl``: ``0.5·masked_mean((logp - old_logp)²)`` (TRL ``policy/approxkl_avg``),
    * ``clipfrac``: fraction of real tokens where the clipped branch is taken (``policy/clipfrac_avg``),
    * ``ratio_mean``, ``ratio_var``: mean and population variance of the ratio over real tokens
      (``val/ratio``; TRL's ``val/ratio_var`` is the variance of minibatch means, left to the trainer).

    TRL takes approxkl and the ratio mean over all positions, pads included (its pad log-probs are equal, so they
    add zeros to the numerator but count in the denominator); we average over real tokens only.
    """
    old_logp = old_logp.detach()
    advantages = advantages.detach()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO detail 8; OpenAI baselines / TRL):

    ``0.5·masked_mean(max((V - R)², (clip(V, V_old - ε_v, V_old + ε_v) - R)²))``.

    ``values``: ``(B, T)`` current critic predictions (with grad); ``old_values``: ``(B, T)`` rollout values;
    ``returns``: ``(B, T)`` GAE returns. ``old_values`` and ``returns`` are detached. Returns a scalar loss and
    detached stats: ``vf_clipfrac`` = fraction of real tokens where the clipped term is the larger
    (TRL ``val/clipfrac_avg``).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution ``softmax(logits)`` over the last dimension: ``-Σ p·log p``.

    ``logits``: ``(..., V)`` -> ``(...)``. Stable for -inf logits (masked vocabulary entries contribute 0).
    Computed in float32 for half-precision inputs (returned in float32); float32/float64 stay as they are.
    TRL computes ``logsumexp(logits) - Σ p·logits``, the same number.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -plogp.sum(dim=-1)


# --------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (detail 5)
# --------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient β (TRL default 0.05). ``update`` does nothing."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op (same signature as :meth:`AdaptiveKLController.update`)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 (and TRL ≤ 0.11 ``AdaptiveKLController``):

    ``err = clip(KL/target - 1, -0.2, 0.2)``;  ``β ← β·(1 + err·n_steps/horizon)``.

    ``current_kl`` is the mean sequence-level KL of the rollout batch (Σ_t kl_t per sequence, averaged), and
    ``n_steps`` the number of sequences (episodes) in it. Defaults: β₀ 0.2, target 6 nats, horizon 10000.
    The state is three Python floats; ``state_dict``/``load_state_dict`` restore it exactly (bit-for-bit resume).
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000) -> None:
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target KL must be a finite number > 0, got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """One controller step: ``β ← β·(1 + clip(current_kl/target - 1, ±0.2)·n_steps/horizon)``."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


# --------------------------------------------------------------------------------------------------------------
# EMA reference (Xu et al. 2024)
# --------------------------------------------------------------------------------------------------------------


def ema_update(target_params: Iterable[Tensor], source_params: Iterable[Tensor], decay: float) -> None:
    """Exponential moving average, in place: ``target ← decay·target + (1 - decay)·source``, under ``no_grad``.

    For an EMA of the policy as the reference model (Xu et al. 2024, "Is DPO superior to PPO for LLM
    alignment?"). ``decay`` ∈ [0, 1]: 1 keeps the target, 0 copies the source. The two iterables (e.g.
    ``ref.parameters()``, ``policy.parameters()``) must pair tensors of equal shape; a length mismatch raises
    ``ValueError``. Source tensors are cast to the target's dtype/device; non-floating tensors are copied.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    with torch.no_grad():
        for target, source in zip(target_params, source_params, strict=True):
            source = source.detach().to(device=target.device, dtype=target.dtype)
            if target.is_floating_point() or target.is_complex():
                target.lerp_(source, 1.0 - decay)
            else:
                target.copy_(source)
