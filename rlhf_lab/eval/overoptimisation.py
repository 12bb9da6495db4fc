"""Reward-model over-optimisation: gold reward against the distance from the initial policy, fitted with the
functional forms of Gao, Schulman & Hilton 2023 ("Scaling Laws for Reward Model Overoptimization", §3, eq. 1–2):

    d = √KL(π‖π_init),   R(d) = gold reward gain over the initial (SFT) policy
    RL (PPO):     R(d) = d·(α − β·log d)          peak at d* = exp(α/β − 1), R(d*) = β·d*
    best-of-n:    R(d) = d·(α − β·d)              peak at d* = α / (2β),    R(d*) = α² / (4β)

Both are linear in (α, β), so ordinary least squares fits them exactly; pure numpy, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class GaoFit:
    form: str           # "rl" | "bon"
    alpha: float
    beta: float
    r2: float           # coefficient of determination of the fit on its points
    points: int
    peak_kl: float      # KL at the fitted maximum (inf when the fit never turns down: β ≤ 0)
    peak_gain: float    # the fitted maximum gold gain over SFT

    def predict(self, kl: np.ndarray) -> np.ndarray:
        d = np.sqrt(np.asarray(kl, dtype=np.float64))
        return d * (self.alpha - self.beta * _curvature(d, self.form))


def _curvature(d: np.ndarray, form: str) -> np.ndarray:
    if form == "rl":
        return np.log(np.where(d > 0, d, 1.0))   # d·log d → 0 as d → 0
    if form == "bon":
        return d
    raise ValueError(f"unknown functional form {form!r}; expected 'rl' or 'bon'")


def fit_gao(kl, gain, form: str = "rl") -> GaoFit:
    """Least-squares (α, β) of R(d) = d·(α − β·f(d)) on KL values and gold gains (both (N,), N ≥ 2 with KL > 0)."""
    kl, gain = np.asarray(kl, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    keep = np.isfinite(kl) & np.isfinite(gain) & (kl > 0)
    kl, gain = kl[keep], gain[keep]
    if len(kl) < 2:
        raise ValueError(f"a Gao et al. fit needs at least 2 points with KL > 0, got {len(kl)}")
    d = np.sqrt(kl)
    design = np.stack([d, -d * _curvature(d, form)], axis=1)           # (N, 2): R = α·d − β·d·f(d)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    residual = gain - design @ np.array([alpha, beta])
    total = ((gain - gain.mean()) ** 2).sum()
    r2 = 1.0 - float((residual ** 2).sum() / total) if total > 0 else math.nan
    peak_kl, peak_gain = _peak(float(alpha), float(beta), form)
    return GaoFit(form, float(alpha), float(beta), r2, len(kl), peak_kl, peak_gain)


def _peak(alpha: float, beta: float, form: str) -> tuple[float, float]:
    if beta <= 0:
        return math.inf, math.inf
    if form == "rl":
        d = math.exp(alpha / beta - 1.0)
        return d * d, beta * d
    d = alpha / (2.0 * beta)
    return (d * d, alpha * alpha / (4.0 * beta)) if d > 0 else (0.0, 0.0)


def overoptimisation_fits(points: pd.DataFrame) -> pd.DataFrame:
    """One Gao et al. fit per method trained on a learned reward (PPO: proxy reward present, not PPO-GT) and per
    best-of-n scored by the reward model, over every evaluation of every run: gold gain = gold − the run's step-0
    gold. Columns `FIT_COLUMNS` (max_kl: the largest KL the fitted points reached)."""
    rows = []
    for method, loss_type, form in (("ppo", None, "rl"), ("best_of_n", "reward_model", "bon")):
        sel = points[(points["method"] == method)
                     & ((points["loss_type"] == loss_type) if loss_type else True)]
        if sel.empty:
            continue
        base = sel[sel["step"] == 0].set_index("run_id")["gold_reward_mean"]
        trained = sel[(sel["step"] > 0) & sel["run_id"].isin(base.index)]
        gain = trained["gold_reward_mean"].to_numpy(float) - base.loc[trained["run_id"]].to_numpy(float)
        try:
            fit = fit_gao(trained["kl_mean"].to_numpy(float), gain, form)
        except ValueError:
            continue
        label = method if loss_type is None else f"{method} by {loss_type}"
        rows.append({"method": label, **{k: getattr(fit, k) for k in
                                         ("form", "alpha", "beta", "r2", "points", "peak_kl", "peak_gain")},
                     "max_kl": float(trained["kl_mean"].max())})
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


FIT_COLUMNS = ["method", "form", "alpha", "beta", "r2", "points", "peak_kl", "peak_gain", "max_kl"]


def describe_peak(fit) -> str:
    """'+0.123 gold at KL 4.5', flagged when the peak lies beyond the largest KL the runs reached (an
    extrapolation), or 'no peak' when the fit never turns down."""
    if not math.isfinite(fit.peak_kl):
        return "no peak (β ≤ 0)"
    beyond = f" (beyond the trained KL ≤ {fit.max_kl:.1f}: an extrapolation)" if fit.peak_kl > fit.max_kl else ""
    return f"+{fit.peak_gain:.3f} gold at KL {fit.peak_kl:.1f}{beyond}"
