"""PPO for language models with four roles (actor, critic, reference, reward), readable top to bottom:

    for each step (trainers/on_policy.py runs the loop, the prompts, evaluation and checkpoints):
        sample (full actor parameters) → score with every role → KL-shaped rewards, GAE, advantages whitened over
        all ranks → ppo_epochs × minibatches × micro-batches → KL controller (global KL) → metrics (TRL's names,
        averaged over ranks)

Exact resume: besides what the on-policy loop saves, the checkpoint holds the critic (with its optimiser and
scheduler, via its strategy), the KL controller and the EMA reference when there is one.
"""
from __future__ import annotations

import logging
import time

import torch

from rlhf_lab.algos.ppo import (AdaptiveKLController, FixedKLController, ema_update, entropy_from_logits,
                                masked_mean, policy_loss, value_loss)
from rlhf_lab.config import PPOConfig
from rlhf_lab.distributed import comm
from rlhf_lab.models.heads import token_values
from rlhf_lab.models.logprobs import completion_logits, token_logps_from_logits
from rlhf_lab.trainers.errors import NonFiniteLossError
from rlhf_lab.trainers.loop import check_finite
from rlhf_lab.trainers.on_policy import OnPolicyRun, OnPolicyTrainer, PromptSet, rows
from rlhf_lab.trainers.ppo_rollout import (Advantages, PPOModels, Rollout, compute_advantages, episode_metrics,
                                           score_rollout)

log = logging.getLogger(__name__)

__all__ = ["PPOTrainer", "PromptSet", "OnPolicyRun"]


class PPOTrainer(OnPolicyTrainer):
    def __init__(self, models: PPOModels, run: OnPolicyRun, cfg: PPOConfig, actor_strategy, critic_strategy):
        """`models.actor` / `models.critic` are already set up by their strategies; `models.reference`,
        `run.eval_reference` and a learned reward model are placed by the actor's strategy."""
        super().__init__(run, cfg, models.actor, actor_strategy, {"actor": actor_strategy, "critic": critic_strategy})
        self.models, self.actor_s, self.critic_s = models, actor_strategy, critic_strategy
        self.proxy_reward = models.reward
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        for role, model in (("policy", models.actor), ("critic", models.critic), ("reference", models.reference),
                            ("reward", getattr(models.reward, "model", None))):
            self.watch(role, model)

    def train_step(self) -> dict:
        """One PPO iteration: roll out, advantages (KL-shaped reward), epochs of updates, KL controller and
        EMA reference; returns the step's metrics."""
        started = time.perf_counter()
        rollout = self.roll_out(self.next_prompts())
        if comm.all_reduce_sum(rollout.mask.sum().detach().cpu()) == 0:
            raise NonFiniteLossError(f"step {self.step + 1}: the reward returned no finite score for any episode")
        adv = compute_advantages(rollout, self.kl_ctl.value, self.cfg, reduce_sum=comm.all_reduce_sum)
        train_stats = self.optimise(rollout, adv)
        seq_kl = float(comm.all_reduce_mean(adv.kl.sum(-1).mean().detach().cpu()))
        self.kl_ctl.update(seq_kl, self.cfg.rollout_batch_size)
        if self.cfg.ema_reference_decay is not None:
            self._update_ema_reference()
        return {**self.rollout_metrics(rollout, adv), **train_stats, "objective/kl_coef": self.kl_ctl.value,
                "train/episodes_per_s": self.cfg.rollout_batch_size / (time.perf_counter() - started)}

    @torch.no_grad()
    def roll_out(self, prompts: PromptSet) -> Rollout:
        """One response per prompt, with the sampler's log-probs as π_old, scored by the other roles under the
        training precision."""
        seqs, logprobs, texts = self.sample(prompts)
        with self.actor_s.autocast():
            return score_rollout(self.models, self.tokenizer, seqs, logprobs, texts, self.cfg, self.device)

    # ------------------------------------------------------------------------------------------------ update
    def optimise(self, rollout: Rollout, adv: Advantages) -> dict:
        cfg, batch = self.cfg, len(rollout.scores)
        mini = batch // cfg.num_mini_batches
        totals: dict[str, list[float]] = {}
        self.models.actor.train()
        self.models.critic.train()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(batch, generator=self.generators["shuffle"])
            for start in range(0, batch, mini):
                for micro in order[start:start + mini].split(cfg.micro_batch_size):
                    stats = self._micro_step(rollout, adv, micro.to(self.device))
                    for k, v in stats.items():
                        totals.setdefault(k, []).append(v)
        self.models.actor.eval()
        self.models.critic.eval()
        out = comm.mean_over_ranks({k: sum(v) / len(v) for k, v in totals.items()})
        ratios = torch.tensor([r for share in comm.all_gather_object(totals["val/ratio"]) for r in share])
        out["val/ratio_var"] = float(ratios.var(unbiased=False)) if len(ratios) > 1 else 0.0
        return out

    def _micro_step(self, rollout: Rollout, adv: Advantages, micro: torch.Tensor) -> dict[str, float]:
        seqs = rows(rollout.seqs, micro)
        mask = rollout.mask[micro]
        with self.actor_s.autocast():
            logits = completion_logits(self.models.actor, seqs, self.cfg.temperature)
            logp = token_logps_from_logits(logits, seqs)
            p_loss, p_stats = policy_loss(logp, rollout.logprobs[micro], adv.advantages[micro], mask, self.cfg.cliprange)
            values = token_values(self.models.critic, seqs).float()
            v_loss, v_stats = value_loss(values, rollout.values[micro], adv.returns[micro], mask,
                                         self.cfg.cliprange_value)
        check_finite(p_loss + v_loss, f"step {self.step + 1}: policy ({p_loss.item()}) + value")
        self.actor_s.backward(p_loss)
        self.critic_s.backward(self.cfg.vf_coef * v_loss)
        self.actor_s.step()
        self.critic_s.step()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.float()), mask)
        return {"policy/approxkl_avg": float(p_stats["approxkl"]), "policy/clipfrac_avg": float(p_stats["clipfrac"]),
                "policy/entropy_avg": float(entropy), "loss/policy_avg": p_loss.item(),
                "loss/value_avg": v_loss.item(), "val/clipfrac_avg": float(v_stats["vf_clipfrac"]),
                "val/ratio": float(p_stats["ratio_mean"])}

    def _update_ema_reference(self) -> None:
        """reference ← decay·reference + (1 − decay)·actor; under ZeRO-3 both are gathered and rank 0's result
        is re-partitioned (the strategy's `modify`)."""
        with self.actor_s.modify(self.models.reference, self.models.actor):
            ema_update(self.actor_s.unwrap(self.models.reference).parameters(),
                       self.actor_s.unwrap().parameters(), self.cfg.ema_reference_decay)

    # ------------------------------------------------------------------------------------------------ metrics
    def rollout_metrics(self, rollout: Rollout, adv: Advantages) -> dict:
        gold_as_is = getattr(self.models.reward, "normalization", None) is None
        if self.run.gold is not None and self.models.reward.name.startswith("gold") and gold_as_is:
            # PPO-GT's score is the gold reward itself (unless a missing-EOS penalty was subtracted from it)
            used_mean = float(rollout.scores[rollout.mask.sum(-1) > 0].mean())
            gold_mean = (lambda *_: used_mean) if self.cfg.missing_eos_penalty is None else (lambda *_: None)
        else:
            gold_mean = self.gold_mean
        return episode_metrics(rollout, adv.kl, adv.non_score_reward, gold_mean)

    # ------------------------------------------------------------------------------------------------ resume
    def extra_state(self) -> dict:
        state = {"kl_ctl": self.kl_ctl.state_dict()}
        if self.cfg.ema_reference_decay is not None:
            with self.actor_s.generation(self.models.reference) as reference:
                state["reference"] = {k: v.detach().cpu().clone() for k, v in reference.state_dict().items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if "reference" in state:
            with self.actor_s.modify(self.models.reference):
                self.actor_s.unwrap(self.models.reference).load_state_dict(state["reference"])
