"""PPO for language models with four roles (actor, critic, reference, reward), readable top to bottom:

    for each step: roll out → KL-shaped rewards, GAE → ppo_epochs × minibatches × micro-batches → KL controller
                   → metrics (TRL's names) → evaluation (shared with DPO) → atomic checkpoint (exact resume)

Exact resume: the checkpoint holds actor, critic, both optimisers and schedulers, the KL controller, every RNG
(global and the three explicit generators: data order, sampling, minibatch shuffling), the data cursor and the
step. SIGTERM / SIGUSR1 (what SLURM sends before preemption) request a checkpoint at the end of the current step
and a clean exit.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lab.algos.ppo import (AdaptiveKLController, FixedKLController, ema_update, entropy_from_logits,
                                masked_mean, policy_loss, value_loss)
from rlhf_lab.config import EvalConfig, PPOConfig
from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.eval.points import point_row
from rlhf_lab.eval.policy_eval import evaluate_policy
from rlhf_lab.eval.samples import write_samples
from rlhf_lab.models.heads import token_values
from rlhf_lab.models.logprobs import completion_logits, token_logps_from_logits
from rlhf_lab.trainers.checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from rlhf_lab.trainers.errors import NonFiniteLossError, PreemptedError
from rlhf_lab.trainers.ppo_rollout import Advantages, PPOModels, Rollout, compute_advantages, roll_out
from rlhf_lab.utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    ids: list[list[int]]     # token ids (encode_prompt)
    texts: list[str]


class PPOTrainer:
    def __init__(self, models: PPOModels, tokenizer, train_prompts: PromptSet, eval_prompts: PromptSet,
                 eval_reference, gold, cfg: PPOConfig, eval_cfg: EvalConfig, steps: int, actor_strategy,
                 critic_strategy, logger, points, identity, run_dir: Path, seed: int, config_hash: str = ""):
        if not train_prompts.ids:
            raise ValueError("PPO needs at least one training prompt; the prompt set is empty")
        self.models, self.tokenizer, self.cfg, self.eval_cfg, self.steps = models, tokenizer, cfg, eval_cfg, steps
        self.train_prompts, self.eval_prompts, self.eval_reference, self.gold = train_prompts, eval_prompts, \
            eval_reference, gold
        self.actor_s, self.critic_s = actor_strategy, critic_strategy
        self.logger, self.points, self.identity = logger, points, identity
        self.checkpoint_dir = Path(run_dir) / "checkpoints"
        self.device = actor_strategy.device
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.generators = {name: torch.Generator().manual_seed(seed + i)
                           for i, name in enumerate(("data", "sampling", "shuffle"))}
        self.order: list[int] = []
        self.cursor, self.step = 0, 0
        self._stop_signal: str | None = None
        self.config_hash = config_hash   # a checkpoint only resumes the configuration that wrote it

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        resumed = self.resume()
        self._install_signal_handlers()
        if not resumed:
            self.evaluate()
        last: dict = {}
        while self.step < self.steps:
            started = time.perf_counter()
            prompts = self._next_prompts()
            rollout = roll_out(self.models, self.tokenizer, prompts.ids, prompts.texts, self.cfg,
                               self.generators["sampling"], self.device)
            if rollout.mask.sum() == 0:
                raise NonFiniteLossError(f"step {self.step + 1}: the reward returned no finite score for any episode")
            adv = compute_advantages(rollout, self.kl_ctl.value, self.cfg)
            train_stats = self.optimise(rollout, adv)
            seq_kl = float((adv.kl.sum(-1)).mean())
            self.kl_ctl.update(seq_kl, len(prompts.ids))
            if self.cfg.ema_reference_decay is not None:
                ema_update(self.models.reference.parameters(), self.actor_s.unwrap().parameters(),
                           self.cfg.ema_reference_decay)
            self.step += 1
            last = {**self.rollout_metrics(rollout, adv), **train_stats,
                    "objective/kl_coef": self.kl_ctl.value,
                    "train/episodes_per_s": len(prompts.ids) / (time.perf_counter() - started)}
            self.logger.log(last, self.step)
            if self.step % self.eval_cfg.every == 0 or self.step == self.steps:
                self.evaluate()
            self._maybe_checkpoint()
        return last

    def _next_prompts(self) -> PromptSet:
        """The next rollout batch from a shuffled pass over the train prompts (reshuffled each epoch)."""
        n, ids, texts = self.cfg.rollout_batch_size, [], []
        while len(ids) < n:
            if self.cursor >= len(self.order):
                self.order = torch.randperm(len(self.train_prompts.ids), generator=self.generators["data"]).tolist()
                self.cursor = 0
            i = self.order[self.cursor]
            self.cursor += 1
            ids.append(self.train_prompts.ids[i])
            texts.append(self.train_prompts.texts[i])
        return PromptSet(ids, texts)

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
                rows = order[start:start + mini]
                for micro in rows.split(cfg.micro_batch_size):
                    stats = self._micro_step(rollout, adv, micro.to(self.device))
                    for k, v in stats.items():
                        totals.setdefault(k, []).append(v)
        self.models.actor.eval()
        self.models.critic.eval()
        out = {k: sum(v) / len(v) for k, v in totals.items()}
        ratios = torch.tensor(totals["val/ratio"])
        out["val/ratio_var"] = float(ratios.var(unbiased=False)) if len(ratios) > 1 else 0.0
        return out

    def _micro_step(self, rollout: Rollout, adv: Advantages, rows: torch.Tensor) -> dict[str, float]:
        seqs = _rows(rollout.seqs, rows)
        mask = rollout.mask[rows]
        with self.actor_s.autocast():
            logits = completion_logits(self.models.actor, seqs, self.cfg.temperature)
            logp = token_logps_from_logits(logits, seqs)
            p_loss, p_stats = policy_loss(logp, rollout.logprobs[rows], adv.advantages[rows], mask, self.cfg.cliprange)
            values = token_values(self.models.critic, seqs).float()
            v_loss, v_stats = value_loss(values, rollout.values[rows], adv.returns[rows], mask,
                                         self.cfg.cliprange_value)
        if not (torch.isfinite(p_loss) and torch.isfinite(v_loss)):
            raise NonFiniteLossError(f"step {self.step + 1}: policy loss {p_loss.item()}, value loss {v_loss.item()}")
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

    # ------------------------------------------------------------------------------------------------ metrics
    def rollout_metrics(self, rollout: Rollout, adv: Advantages) -> dict:
        mask = rollout.mask
        used = mask.sum(-1) > 0
        metrics = {
            "objective/kl": float(adv.kl.sum(-1)[used].mean()),
            "objective/entropy": float((-rollout.logprobs * mask).sum(-1)[used].mean()),
            "objective/non_score_reward": float(adv.non_score_reward[used].mean()),
            "objective/rlhf_reward": float((rollout.scores + adv.non_score_reward)[used].mean()),
            "objective/scores": float(rollout.scores[used].mean()),
            "val/num_eos_tokens": int(rollout.has_eos.sum()),
            "val/response_length": float(rollout.seqs.completion_mask.sum(-1).float().mean()),
            "reward/nonfinite_episodes": rollout.num_nonfinite,
        }
        if self.gold is not None and self.models.reward.name.startswith("gold"):
            metrics["objective/gold"] = metrics["objective/scores"] if self.cfg.missing_eos_penalty is None else None
        elif self.gold is not None:
            texts = [p + c for p, c in zip(rollout.prompts, rollout.completions)]
            metrics["objective/gold"] = float(self.gold.score(texts).mean())
        return metrics

    def evaluate(self) -> None:
        actor = self.actor_s.unwrap()
        result = evaluate_policy(actor, self.eval_reference, self.tokenizer, self.eval_prompts.ids, self.gold,
                                 self.eval_cfg, proxy_reward=self.models.reward)
        if self.actor_s.is_main:
            self.points.write(point_row(self.identity, self.step, result, proxy_reward=result.proxy_reward_mean))
            write_samples(self.checkpoint_dir.parent, self.step, result.records)  # for rlhf_lab.judges
        self.logger.log(result.as_metrics(), self.step)
        log.info("step %d: gold %.4f ± %.4f, KL %.3f ± %.3f, proxy %.3f", self.step, result.gold_reward_mean,
                 result.gold_reward_se, result.kl_mean, result.kl_se, result.proxy_reward_mean)

    # ------------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        state = {"config_hash": self.config_hash, "step": self.step, "order": self.order, "cursor": self.cursor,
                 "kl_ctl": self.kl_ctl.state_dict(),
                 "actor": self.actor_s.state_dict(), "critic": self.critic_s.state_dict(),
                 "rng": capture_rng(self.generators)}
        if self.cfg.ema_reference_decay is not None:
            state["reference"] = self.models.reference.state_dict()
        return state

    def resume(self) -> bool:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        state = load_checkpoint(path)
        if state.get("config_hash") != self.config_hash:
            raise UserError(f"checkpoint {path} was written by a run with a different configuration; resuming it "
                            f"would mix two experiments. Use another run directory, or force=true to start afresh")
        self.step, self.order, self.cursor = state["step"], state["order"], state["cursor"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.actor_s.load_state_dict(state["actor"])
        self.critic_s.load_state_dict(state["critic"])
        if "reference" in state:
            self.models.reference.load_state_dict(state["reference"])
        restore_rng(state["rng"], self.generators)
        log.info("resumed from %s (step %d)", path, self.step)
        return True

    def _maybe_checkpoint(self) -> None:
        due = self.step % self.cfg.checkpoint_every == 0 or self.step == self.steps
        if (due or self._stop_signal) and self.actor_s.is_main:
            save_checkpoint(self.checkpoint_dir, self.step, self.state_dict())
        if self._stop_signal:
            raise PreemptedError(f"received {self._stop_signal}: checkpointed at step {self.step} in "
                                 f"{self.checkpoint_dir}; rerun the same command to resume")

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self._stop_signal = signal.Signals(signum).name
            log.warning("%s received: will checkpoint after step %d and exit", self._stop_signal, self.step + 1)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)


def _rows(seqs: SequenceBatch, rows: torch.Tensor) -> SequenceBatch:
    return SequenceBatch(seqs.input_ids[rows], seqs.attention_mask[rows], seqs.completion_mask[rows], seqs.prompt_width)
