"""Reward-model maths, as pure torch functions: the Bradley-Terry loss and reward post-processing for PPO.

References: Bradley & Terry 1952; Ouyang et al. 2022, eq. 1 (pairwise RM loss); TRL 1.16 ``RewardTrainer``
(margin, ``center_rewards_coefficient``, logged accuracy/margin); Ziegler et al. 2019
"PPO for language models", detail 6 (normalise the reward so SFT samples score mean 0, std 1).

Shapes: ``B`` = number of preference pairs (loss) or of scored responses (post-processing); all inputs ``(B,)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "bradley_terry_loss",
    "clip_rewards",
    "fit_reward_normalization",
    "normalize_rewards",
]


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss, as TRL 1.16 ``RewardTrainer.compute_loss``:

    ``loss = mean(-logσ(r_c - r_r - m)) + c·mean((r_c + r_r)²)``.

    ``chosen_rewards``, ``rejected_rewards``: ``(B,)`` scalar rewards of the chosen / rejected responses.
    ``margin`` m: ``(B,)`` or a float, required reward gap (Llama 2, Touvron et al. 2023, eq. 2); None = 0.
    ``center_rewards_coefficient`` c (Eisenstein et al. 2023): pulls rewards towards 0; None = off.
    Returns a scalar loss and detached stats (TRL's names): ``accuracy`` = mean(r_c > r_r) (ties count as wrong),
    ``margin`` = mean(r_c - r_r) (the input margin not subtracted), ``chosen_mean``, ``rejected_mean``.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must have the same shape, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    with torch.no_grad():
        stats = {
            "accuracy": (chosen_rewards > rejected_rewards).to(diff.dtype).mean(),
            "margin": diff.mean(),
            "chosen_mean": chosen_rewards.mean(),
            "rejected_mean": rejected_rewards.mean(),
        }
    return loss, stats


def fit_reward_normalization(scores: Tensor) -> tuple[float, float]:
    """Gain and bias with ``gain·s + bias`` of mean 0 and (population) std 1 on ``scores`` ``(N,)``.

    Ziegler et al. 2019 / lm-human-preferences: score a batch of SFT samples once, before PPO, then keep
    ``(gain, bias)`` fixed: ``gain = 1/σ``, ``bias = -μ/σ``, with μ and σ² the mean and population variance
    (as ``tf.nn.moments``), computed in float64. Returns Python floats (checkpoint them for exact resume).
    Raises ``ValueError`` for fewer than 2 scores, non-finite scores, or zero spread.
    """
    flat = scores.detach().reshape(-1).to(torch.float64)
    if flat.numel() < 2:
        raise ValueError(f"reward normalisation needs at least 2 scores, got {flat.numel()}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("reward normalisation got non-finite scores")
    mean = flat.mean().item()
    std = math.sqrt(((flat - mean) ** 2).mean().item())
    if not std > 0:
        raise ValueError("reward normalisation needs scores with non-zero spread (all scores are equal)")
    gain = 1.0 / std
    return gain, -mean * gain


def normalize_rewards(scores: Tensor, gain: float, bias: float) -> Tensor:
    """Apply a fitted normalisation: ``gain·scores + bias``. Any shape, same dtype as ``scores``."""
    return scores * gain + bias


def clip_rewards(scores: Tensor, clip: float | None) -> Tensor:
    """Clamp scores to ``[-clip, clip]`` (None: unchanged). Any shape. Raises ``ValueError`` for clip <= 0."""
    if clip is None:
        return scores
    if not clip > 0:
        raise ValueError(f"reward clip must be > 0, got {clip}")
    return torch.clamp(scores, -clip, clip)
