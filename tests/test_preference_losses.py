"""Tests for rlhf_lab.algos.preference.

Expected values are computed here with plain ``math`` from the formulas (the papers' equations, checked against
TRL 1.16's source), never by calling the function under test; inputs are float64 and the tolerance is tight.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlhf_lab.algos.preference import (
    F_DIVERGENCE_LOSSES,
    LABEL_SMOOTHING_LOSSES,
    LOSSES,
    REFERENCE_FREE_LOSSES,
    UNPAIRED_LOSSES,
    LossOutput,
    LossParams,
    PairLogps,
    UnpairedLogps,
    kto_loss,
    preference_metrics,
    validate_params,
)
from tests.float64 import ATOL, RTOL, assert_close, logsig, sig, t  # noqa: F401

# ---------------------------------------------------------------------------------------------- data
# a worked example (policy lc/lr, reference Lc/Lr); lengths deliberately unequal.
LC = [-1.5, -2.0, -1.8, -2.2]
LR = [-2.5, -2.8, -2.0, -3.0]
REF_C = [-1.8, -2.1, -1.9, -2.3]
REF_R = [-2.3, -2.5, -2.1, -2.8]
LEN_C = [3.0, 5.0, 2.0, 4.0]
LEN_R = [6.0, 2.0, 3.0, 1.0]
NLL = 0.83
UL = [-0.9, -0.4, -1.2, -0.1]   # Σ_t log(1 − π) over the rejected tokens (unlikelihood)
B = len(LC)


def make_logps(lc=LC, lr=LR, ref_c=REF_C, ref_r=REF_R, len_c=LEN_C, len_r=LEN_R, nll=NLL, grad=False, ul=UL):
    return PairLogps(
        policy_chosen=t(lc, grad),
        policy_rejected=t(lr, grad),
        reference_chosen=None if ref_c is None else t(ref_c),
        reference_rejected=None if ref_r is None else t(ref_r),
        chosen_lengths=t(len_c),
        rejected_lengths=t(len_r),
        chosen_nll=None if nll is None else t(nll),
        rejected_unlikelihood=None if ul is None else t(ul),
    )


def ratios(lc=LC, lr=LR, ref_c=REF_C, ref_r=REF_R):
    rc = [a - b for a, b in zip(lc, ref_c)]
    rr = [a - b for a, b in zip(lr, ref_r)]
    return rc, rr


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


# Expected per-row losses from the formulas, for the default data. Each takes LossParams, returns a list.
def exp_sigmoid(p):
    rc, rr = ratios()
    return [-logsig(p.beta * (c - r)) for c, r in zip(rc, rr)]


def exp_robust(p):
    rc, rr = ratios()
    e = p.label_smoothing
    return [
        (-(1 - e) * logsig(p.beta * (c - r)) + e * logsig(-p.beta * (c - r))) / (1 - 2 * e)
        for c, r in zip(rc, rr)
    ]


def exp_hinge(p):
    rc, rr = ratios()
    return [max(0.0, 1 - p.beta * (c - r)) for c, r in zip(rc, rr)]


def exp_ipo(p):
    rc, rr = ratios()
    return [((c / lc - r / lr) - 1 / (2 * p.beta)) ** 2 for c, r, lc, lr in zip(rc, rr, LEN_C, LEN_R)]


def exp_exo_pair(p):
    rc, rr = ratios()
    e = p.label_smoothing
    out = []
    for c, r in zip(rc, rr):
        z = p.beta * (c - r)
        out.append(sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e)))
    return out


def exp_nca_pair(p):
    rc, rr = ratios()
    return [
        -logsig(p.beta * c) - 0.5 * logsig(-p.beta * c) - 0.5 * logsig(-p.beta * r) for c, r in zip(rc, rr)
    ]


def exp_bco_pair(p):
    rc, rr = ratios()
    d = p.bco_delta
    return [-logsig(p.beta * c - d) - logsig(-(p.beta * r - d)) for c, r in zip(rc, rr)]


def exp_sppo_hard(p):
    rc, rr = ratios()
    return [(c - 1 / (2 * p.beta)) ** 2 + (r + 1 / (2 * p.beta)) ** 2 for c, r in zip(rc, rr)]


def exp_aot(p):
    pol = sorted(a - b for a, b in zip(LC, LR))
    ref = sorted(a - b for a, b in zip(REF_C, REF_R))
    return [smoothed(p.beta * (a - b), p.label_smoothing) for a, b in zip(pol, ref)]


def exp_aot_unpaired(p):
    rc, rr = ratios()
    return [smoothed(p.beta * (a - b), p.label_smoothing) for a, b in zip(sorted(rc), sorted(rr))]


def exp_apo_zero(p):
    rc, rr = ratios()
    return [(1 - sig(p.beta * c)) + sig(p.beta * r) for c, r in zip(rc, rr)]


def exp_apo_down(p):
    rc, rr = ratios()
    return [sig(p.beta * c) + (1 - sig(p.beta * (c - r))) for c, r in zip(rc, rr)]


def exp_discopop(p):
    rc, rr = ratios()
    out = []
    for c, r in zip(rc, rr):
        z = p.beta * (c - r)
        m = sig(z / p.discopop_tau)
        out.append((1 - m) * (-logsig(z)) + m * math.exp(-z))
    return out


def exp_sigmoid_norm(p):
    rc, rr = ratios()
    return [-logsig(p.beta * (c / lc - r / lr)) for c, r, lc, lr in zip(rc, rr, LEN_C, LEN_R)]


def exp_rpo(p):
    return [x + p.rpo_alpha * NLL for x in exp_sigmoid(p)]


def exp_sft(p):
    return [NLL] * B


def exp_unlikelihood(p):
    return [-c / nc - p.unlikelihood_alpha * u / nr for c, nc, u, nr in zip(LC, LEN_C, UL, LEN_R)]


def exp_simpo(p):
    out = []
    for c, r, nc, nr in zip(LC, LR, LEN_C, LEN_R):
        z = p.beta * (c / nc - r / nr) - p.simpo_gamma
        out.append(smoothed(z, p.label_smoothing))
    return out


def exp_orpo(p):
    out = []
    for c, r, nc, nr in zip(LC, LR, LEN_C, LEN_R):
        ac, ar = c / nc, r / nr
        log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        out.append(NLL - p.orpo_lambda * logsig(log_odds))
    return out


EXPECTED = {
    "sigmoid": exp_sigmoid,
    "robust": exp_robust,
    "hinge": exp_hinge,
    "ipo": exp_ipo,
    "exo_pair": exp_exo_pair,
    "nca_pair": exp_nca_pair,
    "bco_pair": exp_bco_pair,
    "sppo_hard": exp_sppo_hard,
    "aot": exp_aot,
    "aot_unpaired": exp_aot_unpaired,
    "apo_zero": exp_apo_zero,
    "apo_down": exp_apo_down,
    "discopop": exp_discopop,
    "sigmoid_norm": exp_sigmoid_norm,
    "rpo": exp_rpo,
    "simpo": exp_simpo,
    "orpo": exp_orpo,
    "sft": exp_sft,
    "unlikelihood": exp_unlikelihood,
}

PAIRED = sorted(set(LOSSES) - UNPAIRED_LOSSES)


def params_for(name: str, **kw) -> LossParams:
    if name == "exo_pair":
        kw.setdefault("label_smoothing", 1e-3)
    return LossParams(**kw)


# ---------------------------------------------------------------------------------------------- tests
def test_every_paired_loss_has_expected_values():
    assert set(EXPECTED) == set(PAIRED)


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_loss_matches_hand_computed(name, beta):
    p = params_for(name, beta=beta, bco_delta=0.0)
    validate_params(name, p)
    out = LOSSES[name](make_logps(), p)
    assert_close(out.losses, EXPECTED[name](p))


def test_reference_worked_example():
    rc, rr = ratios()
    h = [c - r for c, r in zip(rc, rr)]
    assert h == pytest.approx([0.5, 0.4, 0.0, 0.3], abs=1e-12)
    expected = sum(-logsig(0.1 * x) for x in h) / len(h)
    assert round(expected, 5) == 0.67830  # and not the 0.6839 a tutorial prints
    out = LOSSES["sigmoid"](make_logps(), LossParams(beta=0.1))
    assert out.losses.mean().item() == pytest.approx(expected, rel=1e-12)


def test_policy_equals_reference_gives_log2():
    logps = make_logps(ref_c=LC, ref_r=LR)
    out = LOSSES["sigmoid"](logps, LossParams())
    assert_close(out.losses, [math.log(2)] * B)
    m = preference_metrics(out, logps)
    assert m["rewards/margins"] == 0.0
    assert m["rewards/accuracies"] == 0.0  # ties count as not correct (TRL: chosen > rejected)


def test_rewards_are_beta_logratio_and_detached():
    p = LossParams(beta=0.3)
    rc, rr = ratios()
    for name in sorted(set(PAIRED) - REFERENCE_FREE_LOSSES):
        out = LOSSES[name](make_logps(grad=True), params_for(name, beta=0.3))
        assert_close(out.chosen_rewards, [p.beta * x for x in rc])
        assert_close(out.rejected_rewards, [p.beta * x for x in rr])
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# ---- label smoothing
@pytest.mark.parametrize("name", ["robust", "aot", "aot_unpaired", "simpo", "exo_pair"])
def test_label_smoothing(name):
    p = LossParams(beta=0.5, label_smoothing=0.2)
    validate_params(name, p)
    out = LOSSES[name](make_logps(), p)
    assert_close(out.losses, EXPECTED[name](p))
    plain = LOSSES[name](make_logps(), params_for(name, beta=0.5))
    assert not torch.allclose(out.losses, plain.losses)


def test_robust_is_unbiased_form():
    # ε = 0.25, h = 0.5, β = 1: [-(0.75)logσ(0.5) + 0.25·logσ(-0.5)] / 0.5
    logps = make_logps(lc=[0.0], lr=[0.0], ref_c=[-0.5], ref_r=[0.0], len_c=[1.0], len_r=[1.0])
    out = LOSSES["robust"](logps, LossParams(beta=1.0, label_smoothing=0.25))
    assert_close(out.losses, [(-0.75 * logsig(0.5) + 0.25 * logsig(-0.5)) / 0.5])


def test_sigmoid_rejects_label_smoothing_as_trl_116_ignores_it():
    with pytest.raises(ValueError, match="no effect on loss 'sigmoid'"):
        validate_params("sigmoid", LossParams(label_smoothing=0.1))
    # and the function itself computes plain DPO (TRL 1.16)
    out = LOSSES["sigmoid"](make_logps(), LossParams(label_smoothing=0.1))
    assert_close(out.losses, exp_sigmoid(LossParams()))


# ---- length normalisation
@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_length_normalisation_matters(name):
    p = LossParams(beta=0.1)
    normalised = LOSSES[name](make_logps(), p).losses
    rc, rr = ratios()
    if name == "ipo":
        unnormalised = [((c - r) - 1 / (2 * p.beta)) ** 2 for c, r in zip(rc, rr)]
    else:
        unnormalised = [-logsig(p.beta * (c - r)) for c, r in zip(rc, rr)]
    assert_close(normalised, EXPECTED[name](p))
    assert max(abs(a - b) for a, b in zip(normalised.tolist(), unnormalised)) > 1e-3
    # rewards stay β·(summed) log-ratio, as TRL logs them
    out = LOSSES[name](make_logps(), p)
    assert_close(out.chosen_rewards, [p.beta * x for x in rc])


def test_ipo_single_pair_by_hand():
    # rc = 0.6 over 3 tokens, rr = -0.4 over 2 tokens, β = 0.5: ((0.2 + 0.2) - 1)² = 0.36
    logps = make_logps(lc=[-1.0], lr=[-2.0], ref_c=[-1.6], ref_r=[-1.6], len_c=[3.0], len_r=[2.0])
    out = LOSSES["ipo"](logps, LossParams(beta=0.5))
    assert_close(out.losses, [(0.6 / 3 + 0.4 / 2 - 1.0) ** 2])


# ---- AOT sorting
def test_aot_sorting_changes_the_answer():
    # policy margins [2, -1], reference margins [-1, 2]: paired deltas [3, -3], sorted deltas [0, 0]
    logps = make_logps(
        lc=[0.0, -1.0],
        lr=[-2.0, 0.0],
        ref_c=[-1.0, 0.0],
        ref_r=[0.0, -2.0],
        len_c=[1.0, 1.0],
        len_r=[1.0, 1.0],
    )
    p = LossParams(beta=1.0)
    aot = LOSSES["aot"](logps, p).losses
    assert_close(aot, [math.log(2), math.log(2)])
    unsorted = [-logsig(3.0), -logsig(-3.0)]
    assert abs(aot.mean().item() - sum(unsorted) / 2) > 0.1
    # aot_unpaired sorts rc = [1, -1] and rr = [-2, 2] separately: [-1, 1] - [-2, 2] = [1, -1]
    unpaired = LOSSES["aot_unpaired"](logps, p).losses
    assert_close(unpaired, [-logsig(1.0), -logsig(-1.0)])
    # plain DPO on the same batch: h = [3, -3]
    assert_close(LOSSES["sigmoid"](logps, p).losses, unsorted)


# ---- f-divergence
def f_prime(kind: str, r: float, alpha: float = 0.5) -> float:
    if kind == "forward_kl":
        return 1 - math.exp(-r)
    if kind == "js_divergence":
        return math.log(2) + logsig(r)
    if kind == "alpha_divergence":
        return (math.exp((alpha - 1) * r) - 1) / (alpha - 1)
    return r


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_sigmoid(kind):
    p = LossParams(beta=0.7, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    validate_params("sigmoid", p)
    rc, rr = ratios()
    expected = [-logsig(p.beta * (f_prime(kind, c, 0.3) - f_prime(kind, r, 0.3))) for c, r in zip(rc, rr)]
    out = LOSSES["sigmoid"](make_logps(), p)
    assert_close(out.losses, expected)
    # TRL logs β·log-ratio as rewards whatever the divergence
    assert_close(out.chosen_rewards, [p.beta * x for x in rc])


def test_f_divergence_ipo_normalises_scores():
    p = LossParams(beta=0.2, f_divergence_type="forward_kl")
    rc, rr = ratios()
    expected = [
        ((f_prime("forward_kl", c) / lc - f_prime("forward_kl", r) / lr) - 1 / (2 * p.beta)) ** 2
        for c, r, lc, lr in zip(rc, rr, LEN_C, LEN_R)
    ]
    assert_close(LOSSES["ipo"](make_logps(), p).losses, expected)


def test_alpha_divergence_coef_one_is_reverse_kl():
    a = LOSSES["sigmoid"](
        make_logps(), LossParams(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    )
    assert_close(a.losses, exp_sigmoid(LossParams()))


def test_f_divergence_rejected_for_unsupported_losses():
    with pytest.raises(ValueError, match="only supported for"):
        validate_params("nca_pair", LossParams(f_divergence_type="forward_kl"))
    for name in F_DIVERGENCE_LOSSES:
        validate_params(name, params_for(name, f_divergence_type="js_divergence"))


# ---- RPO, SimPO, ORPO
def test_rpo_adds_alpha_nll():
    p = LossParams(rpo_alpha=0.4)
    rpo = LOSSES["rpo"](make_logps(), p)
    dpo = LOSSES["sigmoid"](make_logps(), p)
    assert_close(rpo.losses, [x + 0.4 * NLL for x in exp_sigmoid(p)])
    assert rpo.losses.mean().item() == pytest.approx(dpo.losses.mean().item() + 0.4 * NLL, rel=1e-12)
    with pytest.raises(ValueError, match="chosen_nll"):
        LOSSES["rpo"](make_logps(nll=None), p)


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE_LOSSES))
def test_reference_free_losses_need_no_reference(name):
    p = LossParams(beta=2.0, simpo_gamma=0.3, orpo_lambda=0.25)
    out = LOSSES[name](make_logps(ref_c=None, ref_r=None), p)
    assert_close(out.losses, EXPECTED[name](p))
    scale = p.orpo_lambda if name == "orpo" else p.beta
    assert_close(out.chosen_rewards, [scale * c / n for c, n in zip(LC, LEN_C)])
    assert_close(out.rejected_rewards, [scale * r / n for r, n in zip(LR, LEN_R)])
    m = preference_metrics(out, make_logps(ref_c=None, ref_r=None))
    assert m["logps/chosen"] == pytest.approx(sum(c / n for c, n in zip(LC, LEN_C)) / B, rel=1e-12)


def test_orpo_extras():
    p = LossParams(orpo_lambda=0.1)
    out = LOSSES["orpo"](make_logps(), p)
    odds = [
        (c / nc - r / nr) - (math.log(1 - math.exp(c / nc)) - math.log(1 - math.exp(r / nr)))
        for c, r, nc, nr in zip(LC, LR, LEN_C, LEN_R)
    ]
    m = preference_metrics(out, make_logps())
    assert m["log_odds_chosen"] == pytest.approx(sum(odds) / B, rel=1e-12)
    assert m["log_odds_ratio"] == pytest.approx(sum(logsig(x) for x in odds) / B, rel=1e-12)
    assert m["nll_loss"] == pytest.approx(NLL, rel=1e-12)


def test_reference_based_loss_without_reference_raises():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        LOSSES["sigmoid"](make_logps(ref_c=None, ref_r=None), LossParams())


# ---- gradients
@pytest.mark.parametrize("name", PAIRED)
def test_gradients_reach_policy_only(name):
    logps = make_logps(grad=True)
    ref_c, ref_r = (
        t(REF_C, True),
        t(REF_R, True),
    )  # even if a caller forgets no_grad, the reference stays frozen
    nll = t(NLL, True)   # Preferred-FT ("sft") moves the policy through the chosen NLL alone
    ul = t(UL, True)     # unlikelihood pushes the rejected tokens down through Σ log(1 − π)
    logps = dataclasses.replace(logps, reference_chosen=ref_c, reference_rejected=ref_r, chosen_nll=nll,
                                rejected_unlikelihood=ul)
    LOSSES[name](logps, params_for(name, beta=0.5)).losses.mean().backward()
    assert ref_c.grad is None and ref_r.grad is None
    if name == "sft":
        assert nll.grad == 1.0 and logps.policy_chosen.grad is None
        return
    if name == "unlikelihood":
        assert_close(ul.grad, [-1.0 / n / B for n in LEN_R])   # α = 1: −α / |y_l| / B
        assert logps.policy_rejected.grad is None
        return
    g = torch.cat([logps.policy_chosen.grad, logps.policy_rejected.grad])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_sigmoid_gradient_by_hand():
    logps = make_logps(grad=True)
    beta = 0.5
    LOSSES["sigmoid"](logps, LossParams(beta=beta)).losses.mean().backward()
    rc, rr = ratios()
    # d/dlc [-logσ(βh)] = -β·σ(-βh); mean over B
    expected = [-beta * sig(-beta * (c - r)) / B for c, r in zip(rc, rr)]
    assert_close(logps.policy_chosen.grad, expected)
    assert_close(logps.policy_rejected.grad, [-x for x in expected])


# ---- KTO
KTO_POL = [-3.0, -4.0, -2.5, -5.0, -1.0]
KTO_REF = [-3.5, -3.6, -2.9, -4.2, -1.4]
KTO_LAB = [True, False, True, False, True]
KTO_POL_KL = [-6.0, -7.0, -5.5, -6.5, -8.0]


def kto_expected(ref_kl, p):
    z0 = max(0.0, sum(a - b for a, b in zip(KTO_POL_KL, ref_kl)) / len(ref_kl))
    rows = []
    for pol, ref, lab in zip(KTO_POL, KTO_REF, KTO_LAB):
        r = pol - ref
        if lab:
            rows.append(p.desirable_weight * (1 - sig(p.beta * (r - z0))))
        else:
            rows.append(p.undesirable_weight * (1 - sig(p.beta * (z0 - r))))
    return z0, rows


def kto_inputs(ref_kl, grad=True):
    return UnpairedLogps(
        policy=t(KTO_POL, grad),
        reference=t(KTO_REF),
        labels=torch.tensor(KTO_LAB),
        policy_kl=t(KTO_POL_KL, grad),
        reference_kl=t(ref_kl),
    )


@pytest.mark.parametrize(
    "ref_kl, positive",
    [
        ([-5.0, -6.0, -5.0, -6.0, -7.0], False),  # mean(policy_kl - reference_kl) = -0.8 -> clamped to 0
        ([-6.5, -7.9, -6.0, -7.5, -8.6], True),  # mean = 0.7 > 0
    ],
)
def test_kto(ref_kl, positive):
    p = LossParams(beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    validate_params("kto", p)
    z0, rows = kto_expected(ref_kl, p)
    assert (z0 > 0) == positive
    inputs = kto_inputs(ref_kl)
    out = LOSSES["kto"](inputs, p)
    assert LOSSES["kto"] is kto_loss
    assert_close(out.losses, rows)
    assert out.extras["kl"].item() == pytest.approx(z0, abs=1e-15)
    rewards = [p.beta * (a - b) for a, b in zip(KTO_POL, KTO_REF)]
    assert_close(out.chosen_rewards, [x for x, lab in zip(rewards, KTO_LAB) if lab])
    assert_close(out.rejected_rewards, [x for x, lab in zip(rewards, KTO_LAB) if not lab])
    # z0 is detached: no gradient reaches the mismatched-pair log-probs, and the policy gradient is that with
    # z0 held constant: d/dπ [λ_D(1-σ(β(r-z0)))] = -λ_D β σ'(.), d/dπ [λ_U(1-σ(β(z0-r)))] = +λ_U β σ'(.)
    out.losses.mean().backward()
    assert inputs.policy_kl.grad is None
    grads = []
    for pol, ref, lab in zip(KTO_POL, KTO_REF, KTO_LAB):
        r = pol - ref
        if lab:
            s = sig(p.beta * (r - z0))
            grads.append(-p.desirable_weight * p.beta * s * (1 - s) / len(KTO_POL))
        else:
            s = sig(p.beta * (z0 - r))
            grads.append(p.undesirable_weight * p.beta * s * (1 - s) / len(KTO_POL))
    assert_close(inputs.policy.grad, grads)
    m = preference_metrics(out, inputs)
    n_d = sum(KTO_LAB)
    assert m["rewards/chosen"] == pytest.approx(
        sum(x for x, lab in zip(rewards, KTO_LAB) if lab) / n_d, rel=1e-12
    )
    assert m["logps/rejected"] == pytest.approx((-4.0 - 5.0) / 2, rel=1e-12)
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], rel=1e-12)
    assert m["kl"] == pytest.approx(z0, abs=1e-15)
    assert "rewards/accuracies" not in m  # TRL's KTO does not log it


def test_kto_all_desirable_gives_empty_rejected():
    inputs = UnpairedLogps(
        t(KTO_POL), t(KTO_REF), torch.ones(5, dtype=torch.bool), t(KTO_POL_KL), t(KTO_POL_KL)
    )
    out = kto_loss(inputs, LossParams())
    assert out.rejected_rewards.shape == (0,) and out.chosen_rewards.shape == (5,)
    m = preference_metrics(out, inputs)
    assert "rewards/rejected" not in m and "rewards/margins" not in m and "rewards/chosen" in m


# ---- registry, metrics, validation
def test_registry():
    expected = {
        "sigmoid",
        "robust",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
        "rpo",
        "simpo",
        "orpo",
        "kto",
        "sft",
        "unlikelihood",
    }
    assert set(LOSSES) == expected
    assert UNPAIRED_LOSSES == {"kto"}
    assert REFERENCE_FREE_LOSSES == {"simpo", "orpo", "sft", "unlikelihood"}
    assert LABEL_SMOOTHING_LOSSES <= set(LOSSES) and F_DIVERGENCE_LOSSES <= set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_returns_finite_batch(name):
    p = params_for(name)
    validate_params(name, p)
    if name in UNPAIRED_LOSSES:
        out = LOSSES[name](kto_inputs([-6.5, -7.9, -6.0, -7.5, -8.6], grad=False), p)
        n = len(KTO_POL)
    else:
        out = LOSSES[name](make_logps(), p)
        n = B
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (n,)
    assert torch.isfinite(out.losses).all()


def test_bco_delta():
    p = LossParams(beta=0.4, bco_delta=0.05)
    assert_close(LOSSES["bco_pair"](make_logps(), p).losses, exp_bco_pair(p))


def test_preference_metrics_names_and_values():
    p = LossParams(beta=0.1)
    logps = make_logps()
    out = LOSSES["sigmoid"](logps, p)
    m = preference_metrics(out, logps)
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    rc, rr = ratios()
    assert m["rewards/chosen"] == pytest.approx(0.1 * sum(rc) / B, rel=1e-12)
    assert m["rewards/rejected"] == pytest.approx(0.1 * sum(rr) / B, rel=1e-12)
    assert m["rewards/margins"] == pytest.approx(0.1 * sum(c - r for c, r in zip(rc, rr)) / B, rel=1e-12)
    assert m["rewards/accuracies"] == 0.75  # h = [0.5, 0.4, 0, 0.3]: the tie is not counted
    assert m["logps/chosen"] == pytest.approx(sum(LC) / B, rel=1e-12)
    assert m["logps/rejected"] == pytest.approx(sum(LR) / B, rel=1e-12)
    assert all(isinstance(v, float) for v in m.values())
    prefixed = preference_metrics(out, logps, prefix="eval_")
    assert prefixed == {"eval_" + k: v for k, v in m.items()}


def test_validate_params_messages():
    with pytest.raises(ValueError) as err:
        validate_params("dpo", LossParams())
    msg = str(err.value)
    assert "'dpo'" in msg and ", ".join(sorted(LOSSES)) in msg
    with pytest.raises(ValueError, match="beta"):
        validate_params("sigmoid", LossParams(beta=0.0))
    with pytest.raises(ValueError, match="beta"):
        validate_params("sigmoid", LossParams(beta=-1.0))
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
            validate_params("robust", LossParams(label_smoothing=eps))
    with pytest.raises(ValueError, match="exo_pair.*label_smoothing > 0"):
        validate_params("exo_pair", LossParams())
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        validate_params("sigmoid", LossParams(f_divergence_type="kl"))
    with pytest.raises(ValueError, match="discopop_tau"):
        validate_params("discopop", LossParams(discopop_tau=0.0))
    validate_params("robust", LossParams(label_smoothing=0.1))
    validate_params("exo_pair", LossParams(label_smoothing=1e-3))


def test_unlikelihood_weight_scales_the_rejected_term():
    p = LossParams(unlikelihood_alpha=0.25)
    assert_close(LOSSES["unlikelihood"](make_logps(), p).losses, exp_unlikelihood(p))
    with pytest.raises(ValueError, match="unlikelihood_alpha must be >= 0"):
        validate_params("unlikelihood", LossParams(unlikelihood_alpha=-1.0))


def test_log_one_minus_p_sums_real_tokens():
    import math

    from rlhf_lab.algos.preference import log_one_minus_p

    logps = t([[math.log(0.5), math.log(0.2)], [math.log(0.9), math.log(0.3)]])
    out = log_one_minus_p(logps, t([[1.0, 1.0], [1.0, 0.0]]))
    assert_close(out, [math.log(0.5) + math.log(0.8), math.log(0.1)])
    assert torch.isfinite(log_one_minus_p(t([[0.0]]), t([[1.0]]))).all()   # π = 1 is capped, not −inf
