"""The DPO-family trainer: one loop for every paired loss in `algos.preference.LOSSES` (and KTO on unpaired
rows made from the pairs). Setup → loop (evaluate at step 0, every N steps and at the end) → save.

The reference model never changes: its log-probs on the training pairs are read from the stage cache (computed
once per reference/dataset/tokenisation and shared by a whole β sweep); the live reference copy is only used by
evaluation (KL on the policy's samples) and by KTO's mismatched-pair baseline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_lab.algos.preference import (LOSSES, REFERENCE_FREE_LOSSES, UNPAIRED_LOSSES, PairLogps, UnpairedLogps,
                                       preference_metrics)
from rlhf_lab.config import AlgoConfig, EvalConfig, OptimConfig, TrainConfig, loss_params
from rlhf_lab.data.batches import PreferenceBatch, TokenizedPair, TokenizedUnpaired, UnpairedBatch
from rlhf_lab.data.collate import batches, collate_pairs, collate_unpaired
from rlhf_lab.eval.points import PointsWriter, RunIdentity, point_row
from rlhf_lab.eval.policy_eval import evaluate_policy
from rlhf_lab.eval.samples import write_samples
from rlhf_lab.models.logprobs import completion_logits, sequence_logps, token_logps_from_logits
from rlhf_lab.trainers.errors import NonFiniteLossError
from rlhf_lab.trainers.optim import build_optimizer, warmup_schedule

log = logging.getLogger(__name__)


@dataclass
class DPOInputs:
    """Everything the loop needs, built by the pipeline from the cached stages."""

    policy: torch.nn.Module            # trained; starts as a copy of the reference (the SFT model)
    reference: torch.nn.Module         # frozen, eval mode
    tokenizer: object
    train_pairs: list[TokenizedPair]
    reference_table: Optional[torch.Tensor]   # (num_rows, 2) cached Σ log π_ref [chosen, rejected]
    eval_prompt_ids: list[list[int]]   # held-out prompts (task test split)
    gold: object | None                # gold reward (None: KL-only evaluation)
    identity: RunIdentity


def unpair(pairs: list[TokenizedPair]) -> list[TokenizedUnpaired]:
    """Paired data → KTO rows: each chosen is desirable, each rejected undesirable (TRL's unpair_preference_dataset)."""
    rows = []
    for p in pairs:
        rows.append(TokenizedUnpaired(p.prompt_ids, p.chosen_ids, True, p.index))
        rows.append(TokenizedUnpaired(p.prompt_ids, p.rejected_ids, False, p.index))
    return rows


def fixed_widths(pairs: list[TokenizedPair]) -> tuple[int, int]:
    """The widest prompt and completion in the dataset: one batch shape for the whole run."""
    prompt = max(len(p.prompt_ids) for p in pairs)
    completion = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return prompt, completion


class DPOTrainer:
    def __init__(self, inputs: DPOInputs, algo: AlgoConfig, optim: OptimConfig, train: TrainConfig,
                 eval_cfg: EvalConfig, strategy, logger, points: PointsWriter, seed: int):
        self.inputs, self.algo, self.train_cfg, self.eval_cfg = inputs, algo, train, eval_cfg
        self.loss_fn, self.params = LOSSES[algo.loss_type], loss_params(algo)
        self.strategy, self.logger, self.points = strategy, logger, points
        optimizer = build_optimizer(inputs.policy.parameters(), optim)
        self.policy = strategy.setup(inputs.policy, optimizer, warmup_schedule(optimizer, optim.warmup_steps))
        # the compiled module shares the policy's parameters; evaluation keeps using the eager module
        self.train_model = torch.compile(self.policy) if train.compile else self.policy
        self.min_widths = fixed_widths(inputs.train_pairs) if train.compile else None
        self.reference = strategy.place(inputs.reference)
        self.generator = torch.Generator().manual_seed(seed)
        self.unpaired = algo.loss_type in UNPAIRED_LOSSES
        self.items = unpair(inputs.train_pairs) if self.unpaired else inputs.train_pairs
        self.micro_batches_per_step = train.batch_size // train.micro_batch_size
        if len(self.items) < train.micro_batch_size:
            raise ValueError(f"only {len(self.items)} training examples for micro_batch_size={train.micro_batch_size}")

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        self.evaluate(step=0)
        stream = self._micro_batch_stream()
        train_seconds, last = 0.0, {}
        for step in range(1, self.train_cfg.steps + 1):
            self.policy.train()
            started = time.perf_counter()
            metrics = self._optimizer_step(stream)
            train_seconds += time.perf_counter() - started
            metrics["train/pairs_per_s"] = step * self.train_cfg.batch_size / train_seconds  # evaluation excluded
            self.logger.log(metrics, step)
            last = metrics
            if step % self.eval_cfg.every == 0 or step == self.train_cfg.steps:
                self.evaluate(step)
        return last

    def _micro_batch_stream(self):
        """Endless shuffled micro-batches (reshuffled each epoch, deterministic under the run seed)."""
        while True:
            yield from batches(self.items, self.train_cfg.micro_batch_size, shuffle=True,
                               generator=self.generator, drop_last=True)

    def _optimizer_step(self, stream) -> dict:
        totals: dict[str, float] = {}
        for _ in range(self.micro_batches_per_step):
            with self.strategy.autocast():
                loss, metrics = self.compute_loss(next(stream))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} ({self.algo.loss_type}); stopping the run")
            self.strategy.backward(loss)
            result = self.strategy.step()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / self.micro_batches_per_step
        totals["train/grad_norm"] = result.grad_norm
        totals["train/lr"] = self.strategy.optimizer.param_groups[0]["lr"]
        return totals

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, items) -> tuple[torch.Tensor, dict[str, float]]:
        if self.unpaired:
            return self._unpaired_loss(collate_unpaired(items, self.inputs.tokenizer.pad_token_id))
        table = None if self.algo.loss_type in REFERENCE_FREE_LOSSES else self.inputs.reference_table
        batch = collate_pairs(items, self.inputs.tokenizer.pad_token_id, table, self.min_widths)
        batch = batch.to(self.strategy.device)
        return self._paired_loss(batch)

    def _paired_loss(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        seqs, b = batch.sequences, batch.num_pairs
        full_logits = None
        if self.algo.loss_type == "orpo":  # its NLL covers prompt tokens too: one all-position forward serves both
            full_logits = self.train_model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                                           position_ids=seqs.position_ids, use_cache=False).logits  # (2B, P+C, V)
            logits = full_logits[:, seqs.prompt_width - 1:-1]           # (2B, C, V) predicting completion tokens
        else:
            logits = completion_logits(self.train_model, seqs)          # (2B, C, V)
        token_logps = token_logps_from_logits(logits, seqs)             # (2B, C)
        logps, lengths = token_logps.sum(-1), seqs.completion_lengths
        ref = batch.reference_logps
        pair = PairLogps(
            policy_chosen=logps[:b], policy_rejected=logps[b:],
            reference_chosen=None if ref is None else ref[:b], reference_rejected=None if ref is None else ref[b:],
            chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
            chosen_nll=self._chosen_nll(token_logps[:b], seqs.completion_mask[:b], seqs, b, full_logits),
        )
        out = self.loss_fn(pair, self.params)
        loss = out.losses.mean()
        return loss, {"train/loss": loss.item(), **preference_metrics(out, pair, prefix="train/")}

    def _chosen_nll(self, chosen_token_logps, chosen_mask, seqs, b: int, full_logits) -> Optional[torch.Tensor]:
        """Mean per-token NLL of the chosen sequences, one mean over the batch's tokens (TRL): completion tokens
        for RPO, prompt + completion tokens for ORPO (from the all-position logits of the same forward)."""
        if self.algo.loss_type == "rpo":
            return -chosen_token_logps.sum() / chosen_mask.sum()
        if self.algo.loss_type == "orpo":
            ids, mask = seqs.input_ids[:b], seqs.attention_mask[:b]
            logits = full_logits[:b, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            target_mask = mask[:, 1:].float()
            return (nll * target_mask).sum() / target_mask.sum()
        return None

    def _unpaired_loss(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch.to(self.strategy.device)
        policy = sequence_logps(self.policy, batch.sequences)
        with torch.no_grad():
            policy_kl = sequence_logps(self.policy, batch.kl_sequences)
            reference = sequence_logps(self.reference, batch.sequences)
            reference_kl = sequence_logps(self.reference, batch.kl_sequences)
        logps = UnpairedLogps(policy=policy, reference=reference, labels=batch.labels,
                              policy_kl=policy_kl, reference_kl=reference_kl)
        out = self.loss_fn(logps, self.params)
        loss = out.losses.mean()
        return loss, {"train/loss": loss.item(), **preference_metrics(out, logps, prefix="train/")}

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> None:
        policy = self.strategy.unwrap(self.policy)
        with self.strategy.autocast():
            result = evaluate_policy(policy, self.reference, self.inputs.tokenizer, self.inputs.eval_prompt_ids,
                                     self.inputs.gold, self.eval_cfg)
        if self.strategy.is_main:
            self.points.write(point_row(self.inputs.identity, step, result))
            write_samples(self.points.path.parent, step, result.records)  # read by rlhf_lab.judges.study
        self.logger.log(result.as_metrics(), step)
        log.info("step %d: gold %.4f ± %.4f, KL %.3f ± %.3f", step, result.gold_reward_mean, result.gold_reward_se,
                 result.kl_mean, result.kl_se)
