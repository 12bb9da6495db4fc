"""The loop every method that learns from its own samples shares (PPO, RLOO, GRPO, online and iterative DPO):

    resume or evaluate step 0 → for each step: this rank's share of the next prompts → the method's step
    (sample → score or label → update) → log → evaluate every N steps and at the end (the same evaluation as
    every other method) → collective atomic checkpoint every N steps, at the end and on SIGTERM / SIGUSR1

Data parallelism: each step draws rollout_batch_size prompts from one shuffled pass that every rank sees
identically; rank r takes rows i % W == r and samples them with its own generator (seed + 1 + 1000·r), so ranks
explore different completions. A method's global statistics (whitening, KL control) are its own business.

Exact resume: the checkpoint holds every trained model's strategy state (model, optimiser, scheduler), every
rank's RNG (global and the explicit generators: data order, sampling, minibatch shuffling), the data cursor, the
step, the compute meter and whatever the method adds (`extra_state`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from rlhf_lab.config import EvalConfig
from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.distributed import comm
from rlhf_lab.models.sampling import sample_with_logprobs
from rlhf_lab.trainers.compute import ComputeMeter, budget_spent
from rlhf_lab.trainers.loop import Checkpointer, StopRequest, evaluate_and_record
from rlhf_lab.utils.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    ids: list[list[int]]     # token ids (encode_prompt)
    texts: list[str]


@dataclass
class OnPolicyRun:
    """What every on-policy trainer receives from its recipe besides its models, strategies and algo config."""

    tokenizer: Any
    train_prompts: PromptSet
    eval_prompts: PromptSet
    eval_reference: torch.nn.Module   # KL is always evaluated against the frozen SFT model
    gold: Any                         # the task's gold reward (None: KL-only evaluation)
    eval_cfg: EvalConfig
    steps: int
    logger: Any
    points: Any                       # PointsWriter on rank 0, else None
    identity: Any                     # eval.points.RunIdentity
    run_dir: Path
    seed: int
    config_hash: str = ""
    checkpoint_every: int = 10
    budget: Any = None                # config.BudgetConfig; flops / seconds budgets end training early


def rows(seqs: SequenceBatch, index: torch.Tensor | slice) -> SequenceBatch:
    """The rows `index` of a token batch (same prompt width)."""
    return SequenceBatch(seqs.input_ids[index], seqs.attention_mask[index], seqs.completion_mask[index],
                         seqs.prompt_width)


def decode_completions(tokenizer, seqs: SequenceBatch) -> list[str]:
    completion_rows = [[t for t, m in zip(row, msk) if m] for row, msk in
                       zip(seqs.completion_ids.tolist(), seqs.completion_mask.tolist())]
    return tokenizer.batch_decode(completion_rows, skip_special_tokens=True)


class OnPolicyTrainer:
    """Subclasses set `self.policy`, `self.policy_strategy` and implement `train_step()`; they may add state
    through `extra_state` / `load_extra_state` and a proxy reward for evaluation (`proxy_reward`)."""

    proxy_reward = None

    def __init__(self, run: OnPolicyRun, cfg, policy: torch.nn.Module, policy_strategy, strategies: dict):
        if not run.train_prompts.ids:
            raise ValueError("on-policy training needs at least one training prompt; the prompt set is empty")
        self.run, self.cfg, self.policy, self.policy_strategy = run, cfg, policy, policy_strategy
        self.tokenizer, self.device = run.tokenizer, policy_strategy.device
        seeds = {"data": run.seed, "sampling": run.seed + 1 + 1000 * comm.rank(), "shuffle": run.seed + 2}
        self.generators = {name: torch.Generator().manual_seed(s) for name, s in seeds.items()}
        self.order: list[int] = []
        self.cursor, self.step = 0, 0
        self.checkpoints = Checkpointer(Path(run.run_dir) / "checkpoints", strategies, run.config_hash)
        self.meter = ComputeMeter()

    def watch(self, role: str, model) -> None:
        """Count `model`'s token forwards as `role` (the gold reward or a callable has none)."""
        if isinstance(model, torch.nn.Module):
            self.meter.watch(role, model)

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        resumed = self.resume()
        stop = StopRequest()
        if not resumed:
            self.evaluate()
        last: dict = {}
        final = self.step >= self.run.steps
        with Progress(f"{self.run.identity.run_id} training", self.run.steps, initial=self.step) as progress:
            while not final:
                last = self.train_step()
                self.step += 1
                self.run.logger.log(last, self.step)
                progress.advance()
                final = self.step >= self.run.steps or self._budget_spent()
                if self.step % self.run.eval_cfg.every == 0 or final:
                    self.evaluate()
                stopping = stop.agreed()
                if stopping or self.step % self.run.checkpoint_every == 0 or final:
                    self.checkpoints.save(self.step, self.state_dict(), self.generators)
                if stopping:
                    stop.stop(self.step, self.checkpoints.root)
        stop.close()
        self.meter.close()
        return last

    def train_step(self) -> dict:
        """One step of the method (sample, score or label, update); returns the step's metrics."""
        raise NotImplementedError

    def _budget_spent(self) -> bool:
        budget = self.run.budget
        return (budget is not None and budget.by in ("flops", "seconds")
                and budget_spent(budget, self.meter.totals()))

    # ------------------------------------------------------------------------------------------------ samples
    def next_prompts(self, count: Optional[int] = None) -> PromptSet:
        """This rank's share (rows i % W == r) of the next `count` (default rollout_batch_size) prompts, from a
        shuffled pass over the train prompts (reshuffled each epoch) that every rank draws identically."""
        n, ids, texts = count or self.cfg.rollout_batch_size, [], []
        prompts = self.run.train_prompts
        while len(ids) < n:
            if self.cursor >= len(self.order):
                self.order = torch.randperm(len(prompts.ids), generator=self.generators["data"]).tolist()
                self.cursor = 0
            i = self.order[self.cursor]
            self.cursor += 1
            ids.append(prompts.ids[i])
            texts.append(prompts.texts[i])
        return PromptSet(comm.shard(ids), comm.shard(texts))

    @torch.no_grad()
    def sample(self, prompts: PromptSet, per_prompt: int = 1) -> tuple[SequenceBatch, torch.Tensor, list[str]]:
        """`per_prompt` completions of every prompt from the full policy (KV cache, left-padded prompts), rows
        prompt-major (rows [g·k, (g+1)·k) share prompt g), with the sampler's log-probs at the training
        temperature (π_old). Returns (sequences (N, P + T), log-probs (N, T), the N prompt texts)."""
        ids = [p for p in prompts.ids for _ in range(per_prompt)]
        texts = [t for t in prompts.texts for _ in range(per_prompt)]
        with self.policy_strategy.autocast():
            with self.policy_strategy.generation(self.policy) as policy:
                seqs, logprobs = sample_with_logprobs(
                    policy, ids, eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                    max_new_tokens=self.cfg.response_length, temperature=self.cfg.temperature, batch_size=len(ids),
                    generator=self.generators["sampling"], sync_finish=self.policy_strategy.synced_generation)
        self.meter.add_samples(len(ids))
        return seqs, logprobs, texts

    def gold_mean(self, prompts: list[str], completions: list[str]) -> float | None:
        """Mean gold reward of this rank's samples (a training-time diagnostic; evaluation is separate)."""
        if self.run.gold is None or not completions:
            return None
        return float(self.run.gold.score([p + c for p, c in zip(prompts, completions)]).mean())

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> None:
        run = self.run
        evaluate_and_record(self.step, self.policy_strategy, self.policy, run.eval_reference, self.tokenizer,
                            run.eval_prompts.ids, run.gold, run.eval_cfg, run.identity, run.points, run.logger,
                            run.run_dir, self.meter, proxy_reward=self.proxy_reward)

    # ------------------------------------------------------------------------------------------------ resume
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"step": self.step, "order": self.order, "cursor": self.cursor, "compute": self.meter.state_dict(),
                **self.extra_state()}

    def resume(self) -> bool:
        path = self.checkpoints.latest()
        if path is None:
            return False
        state = self.checkpoints.load(path, self.generators)
        self.step, self.order, self.cursor = state["step"], state["order"], state["cursor"]
        self.meter.load_state_dict(state["compute"])
        self.load_extra_state(state)
        return True
