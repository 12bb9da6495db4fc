"""PPO's experience phase: roll out the actor, score it, and turn scores into per-token advantages.

One typed container per phase (shapes in comments): `Rollout` (what was sampled and how every role scored it)
and `Advantages` (the KL-shaped rewards, GAE advantages and returns the optimisation phase consumes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_lab.algos.ppo import gae, kl_penalty, masked_whiten, token_rewards
from rlhf_lab.algos.reward import clip_rewards
from rlhf_lab.config import PPOConfig, RewardedConfig
from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.models.heads import token_values
from rlhf_lab.distributed import comm
from rlhf_lab.models.logprobs import completion_logits, token_logps_from_logits
from rlhf_lab.trainers.on_policy import decode_completions


@dataclass
class PPOModels:
    """The four roles. Actor and critic are trained; reference and reward are frozen (eval mode, no grad)."""

    actor: torch.nn.Module       # π_θ, initialised from the SFT model
    critic: torch.nn.Module | None  # V_φ, a scalar-head model initialised from the reward model (or SFT + fresh
                                    # head); None for the critic-free methods (RLOO, GRPO)
    reference: torch.nn.Module   # π_ref for the KL penalty: the SFT model (or its EMA of the actor)
    reward: object               # a rewards.source.RewardSource: learned RM, gold reward (PPO-GT) or a callable


@dataclass
class Rollout:
    seqs: SequenceBatch          # (B, P + T) prompts + sampled responses (truncated after the first EOS)
    mask: torch.Tensor           # (B, T) float: real response tokens of episodes used for the update
    logprobs: torch.Tensor       # (B, T) log π_old(y_t) at the rollout temperature (0 on padding)
    ref_logprobs: torch.Tensor   # (B, T) log π_ref(y_t), same temperature
    values: torch.Tensor         # (B, T) V_old(s_t) (zeros without a critic)
    scores: torch.Tensor         # (B,) score after EOS penalty / clipping (non-finite rows zeroed and masked out)
    raw_scores: torch.Tensor     # (B,) what the reward source returned
    has_eos: torch.Tensor        # (B,) bool: the response ended with EOS
    num_nonfinite: int           # episodes whose score was NaN/inf (excluded from the update)
    prompts: list[str]
    completions: list[str]


@dataclass
class Advantages:
    kl: torch.Tensor             # (B, T) per-token KL estimate (k1 or k3) used in the penalty
    rewards: torch.Tensor        # (B, T) −β·kl_t, plus the score at the last real token
    non_score_reward: torch.Tensor  # (B,) Σ_t −β·kl_t
    advantages: torch.Tensor     # (B, T) GAE, whitened over real tokens
    returns: torch.Tensor        # (B, T) A + V (critic targets)


@torch.no_grad()
def score_rollout(models: PPOModels, tokenizer, seqs: SequenceBatch, logprobs: torch.Tensor | None,
                  prompt_texts: list[str], cfg: RewardedConfig, device) -> Rollout:
    """Score sampled episodes with every role: the reference's log-probs (at the rollout temperature), the
    critic's values and the reward; the actor's log-probs come from the sampler (`logprobs`, (B, T)) or, when
    None, from a forward here. Each role runs one batched pass per call, so ranks run the same number of
    (possibly collective) forwards. The caller holds the strategy's autocast."""
    seqs = seqs.to(device)
    mask = seqs.completion_mask.float()
    if logprobs is None:
        logprobs = token_logps_from_logits(completion_logits(models.actor, seqs, cfg.temperature), seqs)
    logprobs = logprobs.to(device)
    ref_logprobs = token_logps_from_logits(completion_logits(models.reference, seqs, cfg.temperature), seqs)
    values = token_values(models.critic, seqs).float() if models.critic is not None else torch.zeros_like(mask)
    completions = decode_completions(tokenizer, seqs)
    raw = models.reward.score(prompt_texts, completions, seqs).double().cpu()
    has_eos = (seqs.completion_ids == tokenizer.eos_token_id).any(-1).cpu()
    scores, valid = shape_scores(raw, has_eos, cfg)
    mask = mask * valid.to(device).float()[:, None]
    return Rollout(seqs, mask, logprobs, ref_logprobs, values, scores.float().to(device), raw, has_eos,
                   int((~valid).sum()), list(prompt_texts), completions)


def shape_scores(raw: torch.Tensor, has_eos: torch.Tensor, cfg: RewardedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Missing-EOS penalty and clipping; non-finite scores become 0 and are flagged invalid (excluded)."""
    valid = torch.isfinite(raw)
    scores = torch.where(valid, raw, torch.zeros_like(raw))
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~has_eos).double()
    return clip_rewards(scores, cfg.reward_clip), valid


@torch.no_grad()
def compute_advantages(rollout: Rollout, kl_coef: float, cfg: PPOConfig, reduce_sum=None) -> Advantages:
    """KL-penalised per-token rewards (PPO detail 5) → GAE (detail 7) → whitened advantages (detail 6).
    reduce_sum: the all-reduce that makes whitening statistics global across data-parallel ranks."""
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * rollout.mask
    rewards, non_score = token_rewards(rollout.scores, kl, kl_coef, rollout.mask)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, rollout.mask, shift_mean=False, reduce_sum=reduce_sum)
    advantages, returns = gae(rewards, rollout.values, rollout.mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, rollout.mask, shift_mean=True, reduce_sum=reduce_sum) * rollout.mask
    return Advantages(kl, rewards, non_score, advantages, returns)


def episode_metrics(rollout: Rollout, kl: torch.Tensor, non_score_reward: torch.Tensor, gold_mean) -> dict:
    """TRL's names for a rollout; means over this rank's used episodes, then over ranks (counts are summed).
    `kl`: (B, T) per-token KL estimate; `non_score_reward`: (B,) the KL part of the RL reward; `gold_mean`:
    (prompts, completions) → mean gold of this rank's samples, or None."""
    mask = rollout.mask
    used = mask.sum(-1) > 0
    metrics = {
        "objective/kl": float(kl.sum(-1)[used].mean()),
        "objective/entropy": float((-rollout.logprobs * mask).sum(-1)[used].mean()),
        "objective/non_score_reward": float(non_score_reward[used].mean()),
        "objective/rlhf_reward": float((rollout.scores + non_score_reward)[used].mean()),
        "objective/scores": float(rollout.scores[used].mean()),
        "objective/gold": gold_mean(rollout.prompts, rollout.completions),
        "val/response_length": float(rollout.seqs.completion_mask.sum(-1).float().mean()),
    }
    metrics = comm.mean_over_ranks(metrics)
    counts = comm.all_reduce_sum(torch.tensor([float(rollout.has_eos.sum()), float(rollout.num_nonfinite)]))
    metrics["val/num_eos_tokens"] = int(counts[0])
    metrics["reward/nonfinite_episodes"] = int(counts[1])
    return metrics
