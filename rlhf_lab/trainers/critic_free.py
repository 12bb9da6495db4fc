"""RLOO and GRPO: PPO's rollout and reward sources without the critic, readable top to bottom:

    for each step (trainers/on_policy.py runs the loop, the prompts, evaluation and checkpoints):
        k samples per prompt (full actor) → reference log-probs and scores (score_rollout, as PPO)
        → group baselines (RLOO: leave-one-out on the KL-penalised reward; GRPO: group-normalised score)
        → num_iterations × minibatches × micro-batches of the clipped loss → metrics (TRL's names)

A prompt's k samples are drawn on one rank (ranks shard prompts, not samples), so every group baseline is local
and exact at any world size. The maths is in rlhf_lab/algos/critic_free.py.
"""
from __future__ import annotations

import time

import torch

from rlhf_lab.algos.critic_free import grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from rlhf_lab.algos.ppo import entropy_from_logits, kl_penalty, masked_mean
from rlhf_lab.config import CriticFreeConfig
from rlhf_lab.distributed import comm
from rlhf_lab.models.logprobs import completion_logits, token_logps_from_logits
from rlhf_lab.trainers.errors import NonFiniteLossError
from rlhf_lab.trainers.loop import check_finite
from rlhf_lab.trainers.on_policy import OnPolicyRun, OnPolicyTrainer, rows
from rlhf_lab.trainers.ppo_rollout import PPOModels, Rollout, episode_metrics, score_rollout


class CriticFreeTrainer(OnPolicyTrainer):
    def __init__(self, models: PPOModels, run: OnPolicyRun, cfg: CriticFreeConfig, actor_strategy):
        """`models.critic` is None; the actor is set up by its strategy, reference and reward are placed."""
        super().__init__(run, cfg, models.actor, actor_strategy, {"actor": actor_strategy})
        self.models, self.proxy_reward = models, models.reward
        for role, model in (("policy", models.actor), ("reference", models.reference),
                            ("reward", getattr(models.reward, "model", None))):
            self.watch(role, model)

    def train_step(self) -> dict:
        started = time.perf_counter()
        k = self.cfg.samples_per_prompt
        seqs, logprobs, texts = self.sample(self.next_prompts(), k)
        with self.policy_strategy.autocast():
            rollout = score_rollout(self.models, self.tokenizer, seqs, logprobs, texts, self.cfg, self.device)
        if comm.all_reduce_sum(rollout.mask.sum().detach().cpu()) == 0:
            raise NonFiniteLossError(f"step {self.step + 1}: the reward returned no finite score for any episode")
        valid = rollout.mask.sum(-1).cpu() > 0
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.cfg.kl_estimator) * rollout.mask   # (N, T)
        non_score = -self.cfg.kl_coef * kl.sum(-1)                                                       # (N,)
        scores = rollout.scores.cpu().double()
        if self.cfg.name == "rloo":      # the KL penalty is part of the reward the baseline is taken on
            advantages = rloo_advantages(scores + non_score.cpu().double(), k, valid)
        else:
            advantages = grpo_advantages(scores, k, valid, scale=self.cfg.scale_rewards)
        train_stats = self.optimise(rollout, advantages.float().to(self.device))
        return {**episode_metrics(rollout, kl, non_score, self.gold_mean), **train_stats,
                "objective/advantage_abs": float(comm.all_reduce_mean(advantages[valid].abs().mean().float())),
                "train/episodes_per_s": self.cfg.rollout_batch_size * k / (time.perf_counter() - started)}

    def optimise(self, rollout: Rollout, advantages: torch.Tensor) -> dict:
        """num_iterations epochs over the rollout, each in num_mini_batches optimiser steps of micro-batches."""
        cfg, batch = self.cfg, len(rollout.scores)
        mini = batch // cfg.num_mini_batches
        totals: dict[str, list[float]] = {}
        self.policy.train()
        for _ in range(cfg.num_iterations):
            order = torch.randperm(batch, generator=self.generators["shuffle"])
            for start in range(0, batch, mini):
                for micro in order[start:start + mini].split(cfg.micro_batch_size):
                    for key, value in self._micro_step(rollout, advantages, micro.to(self.device)).items():
                        totals.setdefault(key, []).append(value)
        self.policy.eval()
        return comm.mean_over_ranks({key: sum(v) / len(v) for key, v in totals.items()})

    def _micro_step(self, rollout: Rollout, advantages: torch.Tensor, micro: torch.Tensor) -> dict[str, float]:
        seqs, mask = rows(rollout.seqs, micro), rollout.mask[micro]
        with self.policy_strategy.autocast():
            logits = completion_logits(self.policy, seqs, self.cfg.temperature)
            logp = token_logps_from_logits(logits, seqs)
            if self.cfg.name == "grpo":
                loss, stats = grpo_loss(logp, rollout.logprobs[micro], rollout.ref_logprobs[micro],
                                        advantages[micro], mask, self.cfg.cliprange, self.cfg.kl_coef)
            else:
                loss, stats = rloo_loss(logp, rollout.logprobs[micro], advantages[micro], mask, self.cfg.cliprange)
        check_finite(loss, f"step {self.step + 1}: {self.cfg.name} loss")
        self.policy_strategy.backward(loss)
        self.policy_strategy.step()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.float()), mask)
        return {"loss/policy_avg": loss.item(), "policy/approxkl_avg": float(stats["approxkl"]),
                "policy/clipfrac_avg": float(stats["clipfrac"]), "policy/entropy_avg": float(entropy),
                "val/ratio": float(stats["ratio_mean"])}
