"""Preference-optimisation losses (DPO and its family), as pure torch functions.

Every loss computes the same number TRL 1.16 computes on the same log-probabilities, and is registered under
TRL's ``loss_type`` name in :data:`LOSSES` (``sft`` is the DPO paper's Preferred-FT baseline); ``unlikelihood``, the
paper's other baseline, has no TRL counterpart (Welleck et al. 2019). Formulas: the papers cited on each function and TRL 1.16's trainers.

Inputs and shapes
-----------------
``PairLogps`` (paired losses; ``B`` = number of preference pairs):

* ``policy_chosen``, ``policy_rejected``: ``(B,)`` Σ log π(y_t | x, y_<t) over the **completion tokens only**
  (prompt and padding masked), i.e. summed, not averaged.
* ``reference_chosen``, ``reference_rejected``: ``(B,)`` the same under the frozen reference, or ``None`` for the
  reference-free losses (:data:`REFERENCE_FREE_LOSSES`). They are detached inside every loss.
* ``chosen_lengths``, ``rejected_lengths``: ``(B,)`` float completion token counts ``|y|``, used by the
  length-normalised losses (ipo, sigmoid_norm, simpo, orpo).
* ``chosen_nll``: scalar, needed by ``rpo`` and ``orpo`` only: the mean per-token NLL of the chosen sequences, taken
  as one mean over all tokens of the batch (``-logp[mask].mean()``, as TRL does), over the completion tokens for RPO
  and over prompt + completion tokens for ORPO.

``UnpairedLogps`` (KTO; ``B`` = number of single completions): ``policy``/``reference`` ``(B,)`` summed completion
log-probs, ``labels`` ``(B,)`` bool (True = desirable), ``policy_kl``/``reference_kl`` ``(B,)`` summed log-probs of
mismatched (prompt, completion) pairs, used only to estimate the KL baseline z0.

Output
------
``LossOutput.losses`` is ``(B,)``; the training loss is ``losses.mean()``. ``chosen_rewards``/``rejected_rewards``
are the detached implicit rewards TRL logs (``β·(log π - log π_ref)`` for the reference-based losses).

Usage::

    validate_params(name, params)            # once, at configuration time
    out = LOSSES[name](logps, params)
    out.losses.mean().backward()
    log(preference_metrics(out, logps))

Where TRL 1.16 departs from older TRL releases the code follows TRL 1.16 and says so in a comment (search for
"TRL 1.16").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "F_DIVERGENCE_LOSSES",
    "F_DIVERGENCE_TYPES",
    "LABEL_SMOOTHING_LOSSES",
    "LOSSES",
    "REFERENCE_FREE_LOSSES",
    "UNPAIRED_LOSSES",
    "LossFn",
    "LossOutput",
    "LossParams",
    "PairLogps",
    "UnpairedLogps",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "discopop_loss",
    "exo_pair_loss",
    "f_divergence_scores",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "nca_pair_loss",
    "orpo_loss",
    "preference_metrics",
    "robust_loss",
    "rpo_loss",
    "sigmoid_loss",
    "sigmoid_norm_loss",
    "sft_loss",
    "unlikelihood_loss",
    "log_one_minus_p",
    "simpo_loss",
    "sppo_hard_loss",
    "validate_params",
]


# --------------------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of a batch of preference pairs (see the module docstring for shapes)."""

    policy_chosen: Tensor  # (B,) Σ log π over chosen completion tokens (prompt, padding masked)
    policy_rejected: Tensor  # (B,)
    reference_chosen: Tensor | None  # (B,) same under the frozen reference; None for reference-free losses
    reference_rejected: Tensor | None  # (B,)
    chosen_lengths: Tensor  # (B,) |y_c| number of completion tokens (float)
    rejected_lengths: Tensor  # (B,)
    chosen_nll: Tensor | None = None  # scalar; RPO / SFT: completion tokens, ORPO: prompt + completion tokens
    # (B,) Σ_t log(1 − π(y_t | x, y_<t)) over the rejected completion tokens; unlikelihood only
    rejected_unlikelihood: Tensor | None = None


@dataclass(frozen=True)
class UnpairedLogps:
    """Sequence log-probs of a batch of single labelled completions (KTO)."""

    policy: Tensor  # (B,) Σ log π over completion tokens
    reference: Tensor  # (B,) same under the frozen reference
    labels: Tensor  # (B,) bool, True = desirable
    policy_kl: Tensor  # (B,) Σ log π of mismatched (prompt, completion) pairs, for z0
    reference_kl: Tensor  # (B,) same under the reference


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters; field names follow TRL's config names (TRL default in brackets where it matters)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # robust, exo_pair, aot, aot_unpaired, simpo
    rpo_alpha: float = 1.0  # weight of the chosen NLL in rpo
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1  # TRL ORPOConfig calls it `beta`
    discopop_tau: float = 0.05
    # bco_pair baseline δ: a running mean of rewards in TRL <= 0.28, none (= 0) in TRL 1.16; a trainer may keep one
    bco_delta: float = 0.0
    f_divergence_type: str = "reverse_kl"
    # TRL 1.16 DPOConfig default is 0.5 (1.0 would make alpha_divergence identical to reverse_kl); we follow TRL.
    f_alpha_divergence_coef: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    unlikelihood_alpha: float = 1.0  # weight of the rejected completion's unlikelihood term


@dataclass
class LossOutput:
    """Result of a loss.

    ``chosen_logps``/``rejected_logps`` are what TRL reports as ``logps/chosen``/``logps/rejected`` when that is not
    the mean of the summed policy log-probs (SimPO/ORPO: per-token averages; KTO: the desirable/undesirable rows).
    ``extras`` holds further detached scalars TRL logs for the loss (KTO ``kl``; ORPO ``nll_loss``,
    ``log_odds_ratio``, ``log_odds_chosen``).
    """

    losses: Tensor  # (B,) per-example loss; the training loss is losses.mean()
    chosen_rewards: Tensor  # (B,) detached implicit rewards
    rejected_rewards: Tensor  # (B,) detached
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


LossFn = Callable[[PairLogps, LossParams], LossOutput]


# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Clamp on (α-1)·log-ratio before exp() in the α-divergence, per dtype. TRL 1.16 computes in float32 with these
# bounds; its table has no float64 entry, we use float32's bound so float64 runs agree with float32 runs.
_ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


def _logratios(logps: PairLogps, name: str) -> tuple[Tensor, Tensor]:
    """Return (rc, rr) = (policy - reference) for chosen and rejected; the reference is detached (frozen)."""
    if logps.reference_chosen is None or logps.reference_rejected is None:
        raise ValueError(
            f"loss {name!r} needs reference log-probs (reference_chosen/reference_rejected are None)"
        )
    rc = logps.policy_chosen - logps.reference_chosen.detach()
    rr = logps.policy_rejected - logps.reference_rejected.detach()
    return rc, rr


def _rewards(rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    # TRL logs β·log-ratio for every DPO loss type, whatever f-divergence or length normalisation the loss uses.
    return beta * rc.detach(), beta * rr.detach()


def _lengths(lengths: Tensor) -> Tensor:
    # TRL: completion_mask.sum(dim=1).clamp(min=1.0)
    return lengths.detach().clamp(min=1.0)


def f_divergence_scores(logratio: Tensor, params: LossParams) -> Tensor:
    """Scores f'(π/π_ref) replacing the log-ratio r in the f-DPO losses (Wang et al. 2023, "Beyond Reverse KL").

    reverse_kl: r;  forward_kl: 1 - e^{-r};  js_divergence: log 2 + logσ(r);
    alpha_divergence: (e^{(α-1) r} - 1)/(α-1), falling back to r when |α-1| < 1e-6 (as TRL 1.16 does).
    """
    kind = params.f_divergence_type
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        alpha = params.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = (alpha - 1.0) * logratio
        dtype = t.dtype
        work = t if dtype == torch.float64 else t.float()  # TRL computes the exp in float32 (we keep float64)
        work = torch.clamp(work, max=_ALPHA_CLAMP.get(dtype, 80.0))
        return (torch.exp(work) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {kind!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}")


def _scores(logps: PairLogps, params: LossParams, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (rc, rr, chosen_score, rejected_score) with the f-divergence applied to the scores."""
    rc, rr = _logratios(logps, name)
    return rc, rr, f_divergence_scores(rc, params), f_divergence_scores(rr, params)


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1-ε)·logσ(z) - ε·logσ(-z) (conservative / cDPO-style label smoothing), in TRL's operation order."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


# --------------------------------------------------------------------------------------------------------------
# DPO family (TRL DPOTrainer loss_type)
# --------------------------------------------------------------------------------------------------------------


def sigmoid_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """DPO, Rafailov et al. 2023, eq. 7: ``-logσ(β·(s_c - s_r))``, s = f-divergence score of the log-ratio.

    TRL 1.16 applies no label smoothing to ``sigmoid`` (the cDPO term of older TRL was removed; label_smoothing is
    documented for robust and exo_pair only). We follow TRL 1.16; :func:`validate_params` rejects
    label_smoothing > 0 with this loss rather than ignore it silently. Use ``robust`` for noisy labels.
    """
    rc, rr, sc, sr = _scores(logps, params, "sigmoid")
    losses = -F.logsigmoid(params.beta * (sc - sr))
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def robust_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """Robust DPO (rDPO), Chowdhury et al. 2024, eq. 8, unbiased under label-flip rate ε ∈ [0, 0.5):

    ``[-(1-ε)·logσ(β h) + ε·logσ(-β h)] / (1 - 2ε)``, h = s_c - s_r.
    """
    rc, rr, sc, sr = _scores(logps, params, "robust")
    eps = params.label_smoothing
    z = params.beta * (sc - sr)
    clean = -(1 - eps) * F.logsigmoid(z)
    flipped = -eps * F.logsigmoid(-z)
    losses = (clean - flipped) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def hinge_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """SLiC-HF hinge, Zhao et al. 2023, eq. 2 (with the reference log-ratio): ``relu(1 - β h)``."""
    rc, rr, sc, sr = _scores(logps, params, "hinge")
    losses = torch.relu(1 - params.beta * (sc - sr))
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def ipo_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """IPO, Azar et al. 2023, eq. 17: ``((s_c/|y_c| - s_r/|y_r|) - 1/(2β))²`` (β is the paper's τ).

    TRL length-normalises the scores (average per completion token); the logged rewards stay β·(summed) log-ratio.
    """
    rc, rr, sc, sr = _scores(logps, params, "ipo")
    delta = sc / _lengths(logps.chosen_lengths) - sr / _lengths(logps.rejected_lengths)
    losses = (delta - 1 / (2 * params.beta)) ** 2
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def exo_pair_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """EXO-pref, Ji et al. 2024, eq. 16 (K = 2): KL(p_θ ‖ p_ε) with p_θ = (σ(βh), σ(-βh)), p_ε = (1-ε, ε):

    ``σ(βh)·(logσ(βh) - log(1-ε)) + σ(-βh)·(logσ(-βh) - log ε)``; needs ε > 0 (paper: 1e-3).
    """
    rc, rr, sc, sr = _scores(logps, params, "exo_pair")
    eps = params.label_smoothing
    z = params.beta * (sc - sr)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def nca_pair_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """NCA (pairwise), Chen et al. 2024, eq. 11: ``-logσ(β rc) - ½logσ(-β rc) - ½logσ(-β rr)``."""
    rc, rr = _logratios(logps, "nca_pair")
    uc, ur = params.beta * rc, params.beta * rr
    losses = -F.logsigmoid(uc) - 0.5 * F.logsigmoid(-uc) - 0.5 * F.logsigmoid(-ur)
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def bco_pair_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """BCO (pairwise), Jung et al. 2024, eq. 6: ``-logσ(β rc - δ) - logσ(-(β rr - δ))``.

    δ = ``bco_delta``. TRL ≤ 0.28 kept δ as a running mean of the β-rewards; TRL 1.16 has no δ (δ = 0), which is
    our default, so the default matches TRL 1.16; a trainer may maintain δ and pass it in.
    """
    rc, rr = _logratios(logps, "bco_pair")
    uc, ur = params.beta * rc, params.beta * rr
    delta = params.bco_delta
    losses = -F.logsigmoid(uc - delta) - F.logsigmoid(-(ur - delta))
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def sppo_hard_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """SPPO with hard win probabilities (P = 1 / 0), Wu et al. 2024, eq. 4.7: ``(rc - 1/(2β))² + (rr + 1/(2β))²``."""
    rc, rr = _logratios(logps, "sppo_hard")
    losses = (rc - 0.5 / params.beta) ** 2 + (rr + 0.5 / params.beta) ** 2
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def aot_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """AOT (paired), Melnyk et al. 2024: distributional alignment by sorting over the batch.

    Δ = sort(lc - lr) - sort(Lc - Lr) (each sorted ascending, independently), then
    ``-(1-ε)·logσ(βΔ) - ε·logσ(-βΔ)``. ``losses[i]`` belongs to the i-th quantile, not to pair i.
    """
    rc, rr = _logratios(logps, "aot")  # for the rewards and the reference check
    policy_margin = logps.policy_chosen - logps.policy_rejected
    ref_margin = logps.reference_chosen.detach() - logps.reference_rejected.detach()  # type: ignore[union-attr]
    delta = torch.sort(policy_margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    losses = _smoothed_logistic(params.beta * delta, params.label_smoothing)
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def aot_unpaired_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """AOT (unpaired), Melnyk et al. 2024: Δ = sort(rc) - sort(rr), each sorted ascending over the batch;
    ``-(1-ε)·logσ(βΔ) - ε·logσ(-βΔ)``."""
    rc, rr = _logratios(logps, "aot_unpaired")
    delta = torch.sort(rc, dim=0).values - torch.sort(rr, dim=0).values
    losses = _smoothed_logistic(params.beta * delta, params.label_smoothing)
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def apo_zero_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7: ``(1 - σ(β rc)) + σ(β rr)``."""
    rc, rr = _logratios(logps, "apo_zero")
    losses = (1 - torch.sigmoid(params.beta * rc)) + torch.sigmoid(params.beta * rr)
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def apo_down_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """APO-down, D'Oosterlinck et al. 2024, eq. 8: ``σ(β rc) + (1 - σ(β (rc - rr)))``."""
    rc, rr = _logratios(logps, "apo_down")
    losses = torch.sigmoid(params.beta * rc) + (1 - torch.sigmoid(params.beta * (rc - rr)))
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def discopop_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss), Chan Lu et al. 2024, eq. 5: z = βh, m = σ(z/τ):

    ``(1 - m)·(-logσ(z)) + m·exp(-z)``, τ = ``discopop_tau`` (0.05).
    """
    rc, rr, sc, sr = _scores(logps, params, "discopop")
    z = (sc - sr) * params.beta
    m = torch.sigmoid(z / params.discopop_tau)
    losses = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def sigmoid_norm_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """Length-normalised DPO (as TRL ``sigmoid_norm``; cf. SimPO's normalisation, Meng et al. 2024):

    ``-logσ(β·(s_c/|y_c| - s_r/|y_r|))``; the logged rewards stay β·(summed) log-ratio, as in TRL.
    """
    rc, rr, sc, sr = _scores(logps, params, "sigmoid_norm")
    delta = sc / _lengths(logps.chosen_lengths) - sr / _lengths(logps.rejected_lengths)
    losses = -F.logsigmoid(params.beta * delta)
    return LossOutput(losses, *_rewards(rc, rr, params.beta))


def _require_nll(logps: PairLogps, name: str) -> Tensor:
    if logps.chosen_nll is None:
        raise ValueError(
            f"loss {name!r} needs PairLogps.chosen_nll (mean per-token NLL of the chosen sequences)"
        )
    nll = logps.chosen_nll
    if nll.dim() != 0:
        raise ValueError(f"PairLogps.chosen_nll must be a scalar, got shape {tuple(nll.shape)}")
    return nll


def rpo_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """RPO, Pang et al. 2024 ("Iterative Reasoning Preference Optimization"), eq. 1: DPO + α·NLL(chosen).

    ``-logσ(β h) + α·NLL``, NLL = mean per-token NLL over the chosen completion tokens of the batch
    (``chosen_nll``), α = ``rpo_alpha``. TRL 1.16 has no ``rpo_alpha`` any more; the same loss is
    ``loss_type=["sigmoid", "sft"], loss_weights=[1, α]`` (its sft term is ``-logp[chosen completion mask].mean()``).
    The scalar NLL is added to every row so that ``losses.mean()`` is the TRL training loss.
    """
    nll = _require_nll(logps, "rpo")
    out = sigmoid_loss(logps, params)
    out.losses = out.losses + params.rpo_alpha * nll
    return out


def simpo_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """SimPO, Meng et al. 2024, eq. 6 (reference-free): ā = summed log-prob / |y| (completion tokens):

    ``-(1-ε)·logσ(β(āc - ār) - γ) - ε·logσ(-(β(āc - ār) - γ))``, γ = ``simpo_gamma``.

    This is TRL 1.16 ``experimental.cpo.CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0`` (computed there as
    β·((āc - ār) - γ/β), the same number); its rewards and ``logps/*`` are the averaged log-probs (rewards β·ā).
    """
    avg_c = logps.policy_chosen / _lengths(logps.chosen_lengths)
    avg_r = logps.policy_rejected / _lengths(logps.rejected_lengths)
    logits = (avg_c - avg_r) - params.simpo_gamma / params.beta
    losses = _smoothed_logistic(params.beta * logits, params.label_smoothing)
    return LossOutput(
        losses,
        params.beta * avg_c.detach(),
        params.beta * avg_r.detach(),
        chosen_logps=avg_c.detach(),
        rejected_logps=avg_r.detach(),
    )


def _log1mexp(x: Tensor) -> Tensor:
    """Numerically stable log(1 - e^x) for x < 0 (Mächler 2012): branch at -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """ORPO, Hong et al. 2024, eqs. 6-7 (reference-free): with ā = summed completion log-prob / |y|,

    ``log_odds = (āc - ār) - (log(1 - e^āc) - log(1 - e^ār))``, per-row loss ``NLL - λ·logσ(log_odds)``;
    NLL = ``chosen_nll`` over prompt + completion tokens, λ = ``orpo_lambda`` (TRL ORPOConfig ``beta``).
    Rewards λ·ā and ``logps/*`` = ā, as TRL 1.16 ``experimental.orpo`` logs them. TRL casts the log-probs to
    float32 here; we compute in at least float32 (float64 stays float64).
    """
    nll = _require_nll(logps, "orpo")
    avg_c = logps.policy_chosen / _lengths(logps.chosen_lengths)
    avg_r = logps.policy_rejected / _lengths(logps.rejected_lengths)
    if avg_c.dtype in (torch.float16, torch.bfloat16):
        avg_c, avg_r = avg_c.float(), avg_r.float()
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    losses = nll - params.orpo_lambda * ratio
    return LossOutput(
        losses,
        params.orpo_lambda * avg_c.detach(),
        params.orpo_lambda * avg_r.detach(),
        chosen_logps=avg_c.detach(),
        rejected_logps=avg_r.detach(),
        extras={
            "nll_loss": nll.detach(),
            "log_odds_ratio": ratio.detach().mean(),
            "log_odds_chosen": log_odds.detach().mean(),
        },
    )


# --------------------------------------------------------------------------------------------------------------
# KTO (unpaired)
# --------------------------------------------------------------------------------------------------------------


def kto_loss(logps: UnpairedLogps, params: LossParams) -> LossOutput:
    """KTO, Ethayarajh et al. 2024, eq. 7 (TRL KTOTrainer ``loss_type="kto"``):

    z0 = max(0, mean_batch(policy_kl - reference_kl)), detached (mismatched prompt/completion pairs);
    desirable rows ``λ_D·(1 - σ(β(r - z0)))``, undesirable rows ``λ_U·(1 - σ(β(z0 - r)))``, r = log π - log π_ref.

    ``losses`` keeps the input row order (TRL concatenates desirable then undesirable rows; the mean is the same).
    ``chosen_rewards``/``rejected_rewards`` are β·r of the desirable / undesirable rows (possibly empty).
    z0 is a local batch mean: TRL also averages it over data-parallel ranks, which a distributed trainer must do
    itself if it wants the same number.
    """
    labels = logps.labels.to(torch.bool)
    r = logps.policy - logps.reference.detach()
    z0 = (logps.policy_kl.detach() - logps.reference_kl.detach()).mean().clamp(min=0)
    beta = params.beta
    desirable = params.desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = params.undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = beta * r.detach()
    policy = logps.policy.detach()
    return LossOutput(
        losses,
        rewards[labels],
        rewards[~labels],
        chosen_logps=policy[labels],
        rejected_logps=policy[~labels],
        extras={"kl": z0},
    )


def sft_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """Preferred-FT, the DPO paper's baseline (Rafailov et al. 2023, §6): supervised fine-tuning on the chosen
    completions only. TRL 1.16's ``loss_type="sft"``: ``-logp[chosen completion mask].mean()``, one mean over the
    batch's chosen tokens (``chosen_nll``), added to every row. Reference-free; the logged rewards are β times the
    per-token average log-probs, which is what the loss moves."""
    nll = _require_nll(logps, "sft")
    avg_c = logps.policy_chosen / _lengths(logps.chosen_lengths)
    avg_r = logps.policy_rejected / _lengths(logps.rejected_lengths)
    return LossOutput(nll.expand(avg_c.shape[0]), params.beta * avg_c.detach(), params.beta * avg_r.detach(),
                      chosen_logps=avg_c.detach(), rejected_logps=avg_r.detach())


def unlikelihood_loss(logps: PairLogps, params: LossParams) -> LossOutput:
    """Unlikelihood training (Welleck et al. 2019, eq. 4 with the rejected completion as the negative candidates;
    the DPO paper's §6 baseline): raise the chosen completion's likelihood and push down every token of the
    rejected one, per pair

        ``−Σ_t log π(y_w,t) / |y_w| − α·Σ_t log(1 − π(y_l,t)) / |y_l|``,  α = ``unlikelihood_alpha``.

    ``rejected_unlikelihood`` holds the inner sum of the second term. Reference-free; rewards as for ``sft``."""
    if logps.rejected_unlikelihood is None:
        raise ValueError("loss 'unlikelihood' needs PairLogps.rejected_unlikelihood (Σ_t log(1 − π) over the "
                         "rejected completion tokens)")
    avg_c = logps.policy_chosen / _lengths(logps.chosen_lengths)
    avg_r = logps.policy_rejected / _lengths(logps.rejected_lengths)
    unlikely = logps.rejected_unlikelihood / _lengths(logps.rejected_lengths)
    losses = -avg_c - params.unlikelihood_alpha * unlikely
    return LossOutput(losses, params.beta * avg_c.detach(), params.beta * avg_r.detach(),
                      chosen_logps=avg_c.detach(), rejected_logps=avg_r.detach(),
                      extras={"unlikelihood": -unlikely.detach()})


def log_one_minus_p(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Σ_t log(1 − π_t) over real tokens, from (B, T) token log-probs. A token of probability 1 in floating point
    would give −inf: log π is capped at −1e-6 first (a token that certain contributes log(1e-6) ≈ −13.8)."""
    return (_log1mexp(token_logps.clamp(max=-1e-6)) * mask).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# Registry, validation, metrics
# --------------------------------------------------------------------------------------------------------------

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "rpo": rpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_loss,  # type: ignore[dict-item]  # takes UnpairedLogps
    "sft": sft_loss,
    "unlikelihood": unlikelihood_loss,
}

UNPAIRED_LOSSES = {"kto"}
REFERENCE_FREE_LOSSES = {"simpo", "orpo", "sft", "unlikelihood"}
# TRL 1.16 accepts a non-default f_divergence_type only for these (plus "sft"; rpo = sigmoid + sft).
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "rpo"}
# Losses whose formula uses label_smoothing in TRL 1.16; every other loss would ignore it.
LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired", "simpo"}


def validate_params(name: str, params: LossParams) -> None:
    """Raise ``ValueError`` with a clear message if ``name``/``params`` do not make a valid loss configuration."""
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    if not (math.isfinite(params.beta) and params.beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {params.beta}")
    eps = params.label_smoothing
    if not (0.0 <= eps < 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps}")
    if name == "exo_pair" and eps == 0.0:
        raise ValueError("loss 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if eps > 0.0 and name not in LABEL_SMOOTHING_LOSSES:
        raise ValueError(
            f"label_smoothing={eps} has no effect on loss {name!r} in TRL 1.16 (it is used only by "
            f"{', '.join(sorted(LABEL_SMOOTHING_LOSSES))}); set it to 0, or use 'robust' for noisy preference labels"
        )
    if params.f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {params.f_divergence_type!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}"
        )
    if params.f_divergence_type != "reverse_kl" and name not in F_DIVERGENCE_LOSSES:
        raise ValueError(
            f"f_divergence_type={params.f_divergence_type!r} is only supported for "
            f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}; loss {name!r} needs the default 'reverse_kl'"
        )
    if params.f_divergence_type == "alpha_divergence" and not math.isfinite(params.f_alpha_divergence_coef):
        raise ValueError(f"f_alpha_divergence_coef must be finite, got {params.f_alpha_divergence_coef}")
    if name == "discopop" and not params.discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {params.discopop_tau}")
    if name == "rpo" and params.rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {params.rpo_alpha}")
    if name == "unlikelihood" and not params.unlikelihood_alpha >= 0:
        raise ValueError(f"unlikelihood_alpha must be >= 0, got {params.unlikelihood_alpha}")
    if name == "orpo" and params.orpo_lambda < 0:
        raise ValueError(f"orpo_lambda must be >= 0, got {params.orpo_lambda}")
    if name == "kto" and (params.desirable_weight < 0 or params.undesirable_weight < 0):
        raise ValueError(
            f"desirable_weight and undesirable_weight must be >= 0, got "
            f"{params.desirable_weight} and {params.undesirable_weight}"
        )


def _mean(t: Tensor) -> float:
    return t.detach().double().mean().item()


def preference_metrics(
    out: LossOutput, logps: PairLogps | UnpairedLogps, prefix: str = ""
) -> dict[str, float]:
    """TRL's logged metrics for a batch, as Python floats, keys prefixed with ``prefix``.

    Paired: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (mean of chosen > rejected reward),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the batch; logps are the summed policy
    log-probs, or the per-token averages for simpo/orpo as TRL logs them), plus any ``out.extras``.
    Unpaired (KTO): as TRL's KTOTrainer, the chosen/rejected keys only when the batch has such rows, margins only
    when it has both, no accuracies; plus ``kl``.
    """
    metrics: dict[str, float] = {}
    if isinstance(logps, UnpairedLogps):
        chosen_logps, rejected_logps = out.chosen_logps, out.rejected_logps
        assert chosen_logps is not None and rejected_logps is not None
        if out.chosen_rewards.numel() > 0:
            metrics["rewards/chosen"] = _mean(out.chosen_rewards)
            metrics["logps/chosen"] = _mean(chosen_logps)
        if out.rejected_rewards.numel() > 0:
            metrics["rewards/rejected"] = _mean(out.rejected_rewards)
            metrics["logps/rejected"] = _mean(rejected_logps)
        if out.chosen_rewards.numel() > 0 and out.rejected_rewards.numel() > 0:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    else:
        chosen_logps = out.chosen_logps if out.chosen_logps is not None else logps.policy_chosen
        rejected_logps = out.rejected_logps if out.rejected_logps is not None else logps.policy_rejected
        metrics["rewards/chosen"] = _mean(out.chosen_rewards)
        metrics["rewards/rejected"] = _mean(out.rejected_rewards)
        metrics["rewards/accuracies"] = _mean((out.chosen_rewards > out.rejected_rewards).double())
        metrics["rewards/margins"] = _mean(out.chosen_rewards - out.rejected_rewards)
        metrics["logps/chosen"] = _mean(chosen_logps)
        metrics["logps/rejected"] = _mean(rejected_logps)
    for key, value in out.extras.items():
        metrics[key] = _mean(value)
    return {prefix + key: value for key, value in metrics.items()}
