"""Critic-free policy gradients for RLHF: the baseline comes from the other samples of the same prompt, not from a
learned value function, so only the actor trains (no critic role).

Both sample k completions per prompt; rows are grouped prompt-major: rows [g·k, (g+1)·k) are group g.

* **RLOO** (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs", §3.2, after Kool et al. 2019): the whole completion is one action. Its reward carries the KL
  penalty, r_i = score_i − β·Σ_t kl_t, and its advantage is r_i minus the mean reward of the other k − 1 samples.
  The update is REINFORCE on the sequence log-probability, here with PPO's clip on the sequence ratio so that
  more than one epoch over a rollout stays on-policy enough (with one epoch the ratio is 1 and it is plain
  REINFORCE with the leave-one-out baseline).
* **GRPO** (Shao et al. 2024, "DeepSeekMath", §4.1, eqs. 3–4): the group-normalised score
  Â_i = (score_i − mean(score)) / std(score) is every token's advantage; the loss is PPO's per-token clipped
  surrogate minus β times the k3 estimate of KL(π‖π_ref) per token, averaged over a sequence's tokens and then over
  sequences. `scale=False` only centres the scores (Liu et al. 2025, "Understanding R1-Zero-Like Training").

Episodes whose score was not finite are `valid = False`: they are left out of their group's baseline and get
advantage 0. A group with fewer than two valid episodes has no baseline and contributes nothing.
"""
from __future__ import annotations

import torch

from rlhf_lab.algos.ppo import kl_k3, masked_mean

Tensor = torch.Tensor


def grouped(x: Tensor, k: int) -> Tensor:
    """(N,) → (N / k, k), checking that N is a whole number of groups."""
    if x.dim() != 1 or x.shape[0] % k:
        raise ValueError(f"expected a flat tensor of whole groups of {k}, got shape {tuple(x.shape)}")
    return x.view(-1, k)


def rloo_advantages(rewards: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """A_i = r_i − (Σ_{j≠i} r_j) / (k − 1) over the valid members of i's group. (N,) in, (N,) out."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    r, v = grouped(torch.where(valid, rewards, torch.zeros_like(rewards)), k), grouped(valid, k).to(rewards.dtype)
    n = v.sum(-1, keepdim=True)
    others = (r.sum(-1, keepdim=True) - r) / (n - 1).clamp(min=1)
    return torch.where((v > 0) & (n >= 2), r - others, torch.zeros_like(r)).reshape(-1)


def grpo_advantages(scores: Tensor, k: int, valid: Tensor | None = None, scale: bool = True,
                    eps: float = 1e-4) -> Tensor:
    """Â_i = (s_i − mean_g) / (std_g + eps) over the valid members of the group (std with Bessel's correction, as
    TRL computes it); `scale=False`: s_i − mean_g. (N,) in, (N,) out."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    s, v = grouped(torch.where(valid, scores, torch.zeros_like(scores)), k), grouped(valid, k).to(scores.dtype)
    n = v.sum(-1, keepdim=True)
    mean = s.sum(-1, keepdim=True) / n.clamp(min=1)
    centred = (s - mean) * v
    if scale:
        std = ((centred ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    return torch.where((v > 0) & (n >= 2), centred, torch.zeros_like(centred)).reshape(-1)


def rloo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              cliprange: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped REINFORCE on whole sequences: ρ_i = exp(Σ_t (log π − log π_old)), loss = mean_i max(−A_i·ρ_i,
    −A_i·clip(ρ_i, 1 − ε, 1 + ε)). `logp`, `old_logp`, `mask`: (B, T); `advantages`: (B,). Returns the scalar loss
    and detached stats (approxkl on the sequence log-ratio, clipfrac over sequences, ratio mean)."""
    log_ratio = ((logp - old_logp.detach()) * mask).sum(-1)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"approxkl": 0.5 * (log_ratio ** 2).mean(), "clipfrac": (clipped > unclipped).to(logp.dtype).mean(),
                 "ratio_mean": ratio.mean()}
    return loss, stats


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor,
              cliprange: float = 0.2, beta: float = 0.04) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's objective as a loss (eq. 3): per token ℓ_t = −min(ρ_t·Â, clip(ρ_t, 1 − ε, 1 + ε)·Â) + β·k3_t with
    ρ_t = π/π_old and k3_t = π_ref/π − log(π_ref/π) − 1 (eq. 4); mean over each sequence's tokens, then over
    sequences. `logp`, `old_logp`, `ref_logp`, `mask`: (B, T); `advantages`: (B,). A sequence without tokens
    counts 0. Returns the scalar loss and detached stats."""
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()[:, None]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    kl = kl_k3(logp, ref_logp)
    per_token = torch.maximum(unclipped, clipped) + beta * kl
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    loss = per_sequence.mean()
    with torch.no_grad():
        stats = {"approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
                 "ratio_mean": masked_mean(ratio, mask), "kl_k3": masked_mean(kl, mask)}
    return loss, stats
