"""PPO for language models with four roles (actor, critic, reference, reward), readable top to bottom:

    for each step: this rank's share of the prompts → sample (full actor parameters) → score with every role
                   → KL-shaped rewards, GAE, advantages whitened over all ranks → ppo_epochs × minibatches ×
                   micro-batches → KL controller (global KL) → metrics (TRL's names, averaged over ranks)
                   → evaluation (shared with every method) → collective atomic checkpoint (exact resume)

Data parallelism: each PPO step draws rollout_batch_size prompts from one shuffled pass that every rank sees
identically; rank r takes rows i % W == r and samples them with its own generator (seed + 1 + 1000·r), so ranks
explore different completions. Whitening statistics and the KL controller's input are global.

Exact resume: the checkpoint holds actor and critic (with optimisers and schedulers, via their strategies), the
KL controller, the EMA reference when there is one, every rank's RNG (global and the three explicit generators:
data order, sampling, minibatch shuffling), the data cursor and the step. SIGTERM / SIGUSR1 (what SLURM sends
before preemption) request a checkpoint at the end of the current step and a clean exit, agreed by all ranks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lab.algos.ppo import (AdaptiveKLController, FixedKLController, ema_update, entropy_from_logits,
                                masked_mean, policy_loss, value_loss)
from rlhf_lab.config import EvalConfig, PPOConfig
from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.distributed import comm
from rlhf_lab.models.heads import token_values
from rlhf_lab.models.logprobs import completion_logits, token_logps_from_logits
from rlhf_lab.models.sampling import sample_with_logprobs
from rlhf_lab.trainers.compute import ComputeMeter, budget_spent
from rlhf_lab.trainers.errors import NonFiniteLossError
from rlhf_lab.trainers.loop import Checkpointer, StopRequest, check_finite, evaluate_and_record
from rlhf_lab.trainers.ppo_rollout import Advantages, PPOModels, Rollout, compute_advantages, score_rollout
from rlhf_lab.utils.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    ids: list[list[int]]     # token ids (encode_prompt)
    texts: list[str]


class PPOTrainer:
    def __init__(self, models: PPOModels, tokenizer, train_prompts: PromptSet, eval_prompts: PromptSet,
                 eval_reference, gold, cfg: PPOConfig, eval_cfg: EvalConfig, steps: int, actor_strategy,
                 critic_strategy, logger, points, identity, run_dir: Path, seed: int, config_hash: str = "",
                 checkpoint_every: int = 10, budget=None):
        """`models.actor` / `models.critic` are already set up by their strategies; `models.reference`,
        `eval_reference` and a learned reward model are placed by the actor's strategy."""
        if not train_prompts.ids:
            raise ValueError("PPO needs at least one training prompt; the prompt set is empty")
        self.models, self.tokenizer, self.cfg, self.eval_cfg, self.steps = models, tokenizer, cfg, eval_cfg, steps
        self.train_prompts, self.eval_prompts, self.eval_reference, self.gold = train_prompts, eval_prompts, \
            eval_reference, gold
        self.actor_s, self.critic_s = actor_strategy, critic_strategy
        self.logger, self.points, self.identity, self.run_dir = logger, points, identity, Path(run_dir)
        self.checkpoint_every = checkpoint_every
        self.device = actor_strategy.device
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        seeds = {"data": seed, "sampling": seed + 1 + 1000 * comm.rank(), "shuffle": seed + 2}
        self.generators = {name: torch.Generator().manual_seed(s) for name, s in seeds.items()}
        self.order: list[int] = []
        self.cursor, self.step = 0, 0
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints",
                                        {"actor": actor_strategy, "critic": critic_strategy}, config_hash)
        self.budget = budget        # a config.BudgetConfig; flops / seconds budgets end training early
        self.meter = ComputeMeter()
        for role, model in (("policy", models.actor), ("critic", models.critic), ("reference", models.reference),
                            ("reward", getattr(models.reward, "model", None))):
            if isinstance(model, torch.nn.Module):   # the gold reward or a callable has no token forwards
                self.meter.watch(role, model)

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        resumed = self.resume()
        stop = StopRequest()
        if not resumed:
            self.evaluate()
        last: dict = {}
        final = self.step >= self.steps
        with Progress(f"{self.identity.run_id} training", self.steps, initial=self.step) as progress:
            while not final:
                last = self.ppo_step()
                self.logger.log(last, self.step)
                progress.advance()
                final = self.step >= self.steps or self._budget_spent()
                if self.step % self.eval_cfg.every == 0 or final:
                    self.evaluate()
                stopping = stop.agreed()
                if stopping or self.step % self.checkpoint_every == 0 or final:
                    self.checkpoints.save(self.step, self.state_dict(), self.generators)
                if stopping:
                    stop.stop(self.step, self.checkpoints.root)
        stop.close()
        self.meter.close()
        return last

    def _budget_spent(self) -> bool:
        return (self.budget is not None and self.budget.by in ("flops", "seconds")
                and budget_spent(self.budget, self.meter.totals()))

    def ppo_step(self) -> dict:
        """One PPO iteration: roll out, advantages (KL-shaped reward), epochs of updates, KL controller and
        EMA reference; returns the step's metrics."""
        started = time.perf_counter()
        rollout = self.roll_out(self._next_prompts())
        if comm.all_reduce_sum(rollout.mask.sum().detach().cpu()) == 0:
            raise NonFiniteLossError(f"step {self.step + 1}: the reward returned no finite score for any episode")
        adv = compute_advantages(rollout, self.kl_ctl.value, self.cfg, reduce_sum=comm.all_reduce_sum)
        train_stats = self.optimise(rollout, adv)
        seq_kl = float(comm.all_reduce_mean(adv.kl.sum(-1).mean().detach().cpu()))
        self.kl_ctl.update(seq_kl, self.cfg.rollout_batch_size)
        if self.cfg.ema_reference_decay is not None:
            self._update_ema_reference()
        self.step += 1
        return {**self.rollout_metrics(rollout, adv), **train_stats, "objective/kl_coef": self.kl_ctl.value,
                "train/episodes_per_s": self.cfg.rollout_batch_size / (time.perf_counter() - started)}

    def _next_prompts(self) -> PromptSet:
        """This rank's share (rows i % W == r) of the next rollout batch, from a shuffled pass over the train
        prompts (reshuffled each epoch) that every rank draws identically."""
        n, ids, texts = self.cfg.rollout_batch_size, [], []
        while len(ids) < n:
            if self.cursor >= len(self.order):
                self.order = torch.randperm(len(self.train_prompts.ids), generator=self.generators["data"]).tolist()
                self.cursor = 0
            i = self.order[self.cursor]
            self.cursor += 1
            ids.append(self.train_prompts.ids[i])
            texts.append(self.train_prompts.texts[i])
        return PromptSet(comm.shard(ids), comm.shard(texts))

    @torch.no_grad()
    def roll_out(self, prompts: PromptSet) -> Rollout:
        """Sample one response per prompt with the full actor (KV cache, left-padded prompts), keeping the
        sampler's log-probs as π_old, then score it with the other roles, all under the training precision."""
        with self.actor_s.autocast():
            with self.actor_s.generation(self.models.actor) as actor:
                seqs, logprobs = sample_with_logprobs(actor, prompts.ids, eos_id=self.tokenizer.eos_token_id,
                                          pad_id=self.tokenizer.pad_token_id, max_new_tokens=self.cfg.response_length,
                                          temperature=self.cfg.temperature, batch_size=len(prompts.ids),
                                          generator=self.generators["sampling"],
                                          sync_finish=self.actor_s.synced_generation)
            self.meter.add_samples(len(prompts.ids))
            return score_rollout(self.models, self.tokenizer, seqs, logprobs, prompts.texts, self.cfg, self.device)

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
        out = comm.mean_over_ranks({k: sum(v) / len(v) for k, v in totals.items()})
        ratios = torch.tensor([r for share in comm.all_gather_object(totals["val/ratio"]) for r in share])
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
        """TRL's names; means over this rank's episodes, then over ranks (counts are summed)."""
        mask = rollout.mask
        used = mask.sum(-1) > 0
        metrics = {
            "objective/kl": float(adv.kl.sum(-1)[used].mean()),
            "objective/entropy": float((-rollout.logprobs * mask).sum(-1)[used].mean()),
            "objective/non_score_reward": float(adv.non_score_reward[used].mean()),
            "objective/rlhf_reward": float((rollout.scores + adv.non_score_reward)[used].mean()),
            "objective/scores": float(rollout.scores[used].mean()),
            "val/response_length": float(rollout.seqs.completion_mask.sum(-1).float().mean()),
        }
        gold_as_is = getattr(self.models.reward, "normalization", None) is None
        if self.gold is not None and self.models.reward.name.startswith("gold") and gold_as_is:
            metrics["objective/gold"] = metrics["objective/scores"] if self.cfg.missing_eos_penalty is None else None
        elif self.gold is not None:
            texts = [p + c for p, c in zip(rollout.prompts, rollout.completions)]
            metrics["objective/gold"] = float(self.gold.score(texts).mean())
        metrics = comm.mean_over_ranks(metrics)
        counts = comm.all_reduce_sum(torch.tensor([float(rollout.has_eos.sum()), float(rollout.num_nonfinite)]))
        metrics["val/num_eos_tokens"] = int(counts[0])
        metrics["reward/nonfinite_episodes"] = int(counts[1])
        return metrics

    def evaluate(self) -> None:
        evaluate_and_record(self.step, self.actor_s, self.models.actor, self.eval_reference, self.tokenizer,
                            self.eval_prompts.ids, self.gold, self.eval_cfg, self.identity, self.points,
                            self.logger, self.run_dir, self.meter, proxy_reward=self.models.reward)

    # ------------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        state = {"step": self.step, "order": self.order, "cursor": self.cursor, "kl_ctl": self.kl_ctl.state_dict(),
                 "compute": self.meter.state_dict()}
        if self.cfg.ema_reference_decay is not None:
            with self.actor_s.generation(self.models.reference) as reference:
                state["reference"] = {k: v.detach().cpu().clone() for k, v in reference.state_dict().items()}
        return state

    def resume(self) -> bool:
        path = self.checkpoints.latest()
        if path is None:
            return False
        state = self.checkpoints.load(path, self.generators)
        self.step, self.order, self.cursor = state["step"], state["order"], state["cursor"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.meter.load_state_dict(state["compute"])
        if "reference" in state:
            with self.actor_s.modify(self.models.reference):
                self.actor_s.unwrap(self.models.reference).load_state_dict(state["reference"])
        return True


def _rows(seqs: SequenceBatch, rows: torch.Tensor) -> SequenceBatch:
    return SequenceBatch(seqs.input_ids[rows], seqs.attention_mask[rows], seqs.completion_mask[rows], seqs.prompt_width)
