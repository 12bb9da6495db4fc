"""The DPO-family trainer: one loop for every paired loss in `algos.preference.LOSSES` (and KTO on unpaired
rows made from the pairs). Setup → (resume) → loop (evaluate at step 0, every N steps and at the end; checkpoint
every train.checkpoint_every steps and on SIGTERM/SIGUSR1) → save. Precision, accumulation, data sharding across
ranks, evaluation and checkpoints come from the loop skeleton (`trainers/loop.py`); this file holds the maths.

The reference model never changes: its log-probs on the training pairs are read from the stage cache (computed
once per reference/dataset/tokenisation and shared by a whole β sweep); the live reference copy is only used by
evaluation (KL on the policy's samples) and by KTO's mismatched-pair baseline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rlhf_lab.algos.preference import (LOSSES, REFERENCE_FREE_LOSSES, UNPAIRED_LOSSES, LossOutput, PairLogps,
                                       UnpairedLogps, log_one_minus_p, preference_metrics)
from rlhf_lab.config import AlgoConfig, EvalConfig, OptimConfig, TrainConfig, loss_params
from rlhf_lab.data.batches import PreferenceBatch, TokenizedPair, TokenizedUnpaired, UnpairedBatch
from rlhf_lab.data.collate import collate_pairs, collate_unpaired
from rlhf_lab.eval.points import PointsWriter, RunIdentity
from rlhf_lab.models.logprobs import completion_logits, sequence_logps, token_logps_from_logits
from rlhf_lab.trainers.compute import ComputeMeter, budget_spent
from rlhf_lab.trainers.errors import NonFiniteLossError  # noqa: F401 (re-exported for callers and tests)
from rlhf_lab.trainers.loop import (Checkpointer, GlobalBatches, StopRequest, accumulate, accumulation_steps,
                                    build_trained, evaluate_and_record, rank_share)
from rlhf_lab.utils.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class DPOInputs:
    """Everything the loop needs, built by the pipeline from the cached stages."""

    policy: torch.nn.Module            # trained; starts as a copy of the reference (the SFT model)
    reference: torch.nn.Module         # frozen, eval mode
    tokenizer: object
    train_pairs: list[TokenizedPair] | list[TokenizedUnpaired]   # unpaired: a KTO-style dataset
    reference_table: Optional[torch.Tensor]   # cached Σ log π_ref: (num_rows, 2) [chosen, rejected] for pairs,
                                              # (num_rows,) for unpaired data
    eval_prompt_ids: list[list[int]]   # held-out prompts (task test split)
    gold: object | None                # gold reward (None: KL-only evaluation)
    identity: RunIdentity


def unpair(pairs: list[TokenizedPair]) -> list[TokenizedUnpaired]:
    """Paired data → KTO rows: each chosen is desirable, each rejected undesirable (TRL's unpair_preference_dataset).
    Row r's chosen gets index 2r, its rejected 2r + 1: their entries in the flattened (num_rows·2,) reference
    table (`unpaired_table`)."""
    rows = []
    for p in pairs:
        rows.append(TokenizedUnpaired(p.prompt_ids, p.chosen_ids, True, 2 * p.index))
        rows.append(TokenizedUnpaired(p.prompt_ids, p.rejected_ids, False, 2 * p.index + 1))
    return rows


def kto_items(items: list, table: Optional[torch.Tensor]) -> tuple[list[TokenizedUnpaired], Optional[torch.Tensor]]:
    """What a KTO loss trains on: an unpaired dataset as it is, or paired data unpaired, with the reference
    table in the matching (N,) layout ((num_rows, 2) row-major flattens to index 2r + [0 chosen | 1 rejected])."""
    if items and isinstance(items[0], TokenizedUnpaired):
        return items, table
    return unpair(items), None if table is None else table.reshape(-1)


def fixed_widths(pairs: list[TokenizedPair]) -> tuple[int, int]:
    """The widest prompt and completion in the dataset: one batch shape for the whole run."""
    prompt = max(len(p.prompt_ids) for p in pairs)
    completion = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return prompt, completion


def paired_loss(model, batch: PreferenceBatch, loss_type: str, params) -> tuple[LossOutput, PairLogps]:
    """One forward of `model` over both halves of a pair batch (rows [0, B) chosen, [B, 2B) rejected) → the
    loss `loss_type` of `algos.preference.LOSSES`, per pair. `batch.reference_logps`: (2B,) or None for the
    reference-free losses. Shared by offline DPO and online DPO."""
    seqs, b = batch.sequences, batch.num_pairs
    full_logits = None
    if loss_type == "orpo":  # its NLL covers prompt tokens too: one all-position forward serves both
        full_logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                            position_ids=seqs.position_ids, use_cache=False).logits    # (2B, P+C, V)
        logits = full_logits[:, seqs.prompt_width - 1:-1]                              # (2B, C, V) completion
    else:
        logits = completion_logits(model, seqs)                                        # (2B, C, V)
    token_logps = token_logps_from_logits(logits, seqs)                                # (2B, C)
    logps, lengths, mask = token_logps.sum(-1), seqs.completion_lengths, seqs.completion_mask
    ref = batch.reference_logps
    pair = PairLogps(
        policy_chosen=logps[:b], policy_rejected=logps[b:],
        reference_chosen=None if ref is None else ref[:b], reference_rejected=None if ref is None else ref[b:],
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        chosen_nll=_chosen_nll(loss_type, token_logps[:b], mask[:b], seqs, b, full_logits),
        rejected_unlikelihood=log_one_minus_p(token_logps[b:], mask[b:]) if loss_type == "unlikelihood" else None,
    )
    return LOSSES[loss_type](pair, params), pair


def _chosen_nll(loss_type: str, chosen_token_logps, chosen_mask, seqs, b: int, full_logits) -> Optional[torch.Tensor]:
    """Mean per-token NLL of the chosen sequences, one mean over the batch's tokens (TRL): completion tokens
    for RPO and SFT (Preferred-FT), prompt + completion tokens for ORPO (from the all-position logits)."""
    if loss_type in ("rpo", "sft"):
        return -chosen_token_logps.sum() / chosen_mask.sum()
    if loss_type == "orpo":
        ids, mask = seqs.input_ids[:b], seqs.attention_mask[:b]
        logits = full_logits[:b, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        target_mask = mask[:, 1:].float()
        return (nll * target_mask).sum() / target_mask.sum()
    return None


class DPOTrainer:
    def __init__(self, inputs: DPOInputs, algo: AlgoConfig, optim: OptimConfig, train: TrainConfig,
                 eval_cfg: EvalConfig, strategy, logger, points: PointsWriter, seed: int,
                 run_dir: Path | None = None, config_hash: str = ""):
        self.inputs, self.algo, self.train_cfg, self.eval_cfg = inputs, algo, train, eval_cfg
        self.loss_fn, self.params = LOSSES[algo.loss_type], loss_params(algo)
        self.strategy, self.logger, self.points = strategy, logger, points
        self.run_dir = Path(run_dir) if run_dir is not None else points.path.parent
        self.accum = accumulation_steps(train.batch_size, train.micro_batch_size, "train.batch_size")
        self.policy = build_trained(strategy, inputs.policy, optim)
        # the compiled module shares the policy's parameters; evaluation keeps using the eager module
        self.train_model = torch.compile(self.policy) if train.compile else self.policy
        self.reference = strategy.place(inputs.reference)
        self.generator = torch.Generator().manual_seed(seed)
        self.unpaired = algo.loss_type in UNPAIRED_LOSSES
        items, self.reference_table = inputs.train_pairs, inputs.reference_table
        if self.unpaired:
            items, self.reference_table = kto_items(items, self.reference_table)
        elif items and isinstance(items[0], TokenizedUnpaired):
            raise ValueError(f"loss_type {algo.loss_type!r} needs paired data (prompt/chosen/rejected); "
                             f"unpaired rows train only {sorted(UNPAIRED_LOSSES)}")
        # compiled paired batches are padded to one shape for the whole run (no recompiles)
        self.min_widths = fixed_widths(items) if train.compile and not self.unpaired else None
        self.batches = GlobalBatches(items, train.batch_size, self.generator)
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints", {"policy": strategy}, config_hash)
        self.meter = ComputeMeter()
        self.meter.watch("policy", *{id(m): m for m in (self.policy, self.train_model)}.values())
        self.meter.watch("reference", self.reference)

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        step = self.resume()
        stop = StopRequest()
        if step == 0:
            self.evaluate(step=0)
        last, final = {}, step >= self.train_cfg.steps
        with Progress(f"{self.inputs.identity.run_id} training", self.train_cfg.steps, initial=step) as progress:
            while not final:
                step += 1
                self.policy.train()
                started = time.perf_counter()
                last = metrics = self.train_step()
                metrics["train/pairs_per_s"] = self.train_cfg.batch_size / (time.perf_counter() - started)
                self.logger.log(metrics, step)
                progress.advance()
                final = step >= self.train_cfg.steps or self._budget_spent()
                if step % self.eval_cfg.every == 0 or final:
                    self.evaluate(step)
                stopping = stop.agreed()
                if stopping or step % self.train_cfg.checkpoint_every == 0 or final:
                    state = {"batches": self.batches.state_dict(), "compute": self.meter.state_dict()}
                    self.checkpoints.save(step, state, {"data": self.generator})
                if stopping:
                    stop.stop(step, self.checkpoints.root)
        stop.close()
        self.meter.close()
        return last

    def _budget_spent(self) -> bool:
        budget = self.train_cfg.budget
        return budget.by in ("flops", "seconds") and budget_spent(budget, self.meter.totals())

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next global batch (this rank's share, accumulated)."""
        return accumulate(self.strategy, rank_share(self.batches.next(), self.accum), self.compute_loss, "train")

    def resume(self) -> int:
        """Continue from the newest complete checkpoint (policy, optimizer, scheduler, RNG, data cursor)."""
        path = self.checkpoints.latest()
        if path is None:
            return 0
        state = self.checkpoints.load(path, {"data": self.generator})
        self.batches.load_state_dict(state["batches"])
        self.meter.load_state_dict(state["compute"])
        return int(path.name.split("-")[1])

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, items) -> tuple[torch.Tensor, dict[str, float]]:
        if self.unpaired:
            return self._unpaired_loss(collate_unpaired(items, self.inputs.tokenizer.pad_token_id,
                                                        self.reference_table))
        table = None if self.algo.loss_type in REFERENCE_FREE_LOSSES else self.reference_table
        batch = collate_pairs(items, self.inputs.tokenizer.pad_token_id, table, self.min_widths)
        batch = batch.to(self.strategy.device)
        return self._paired_loss(batch)

    def _paired_loss(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        out, pair = paired_loss(self.train_model, batch, self.algo.loss_type, self.params)
        loss = out.losses.mean()
        return loss, {"train/loss": loss.item(), **preference_metrics(out, pair, prefix="train/")}

    def _unpaired_loss(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch.to(self.strategy.device)
        policy = sequence_logps(self.policy, batch.sequences)
        with torch.no_grad():
            policy_kl = sequence_logps(self.policy, batch.kl_sequences)
            # the matched sequences' reference log-probs come from the cached table when there is one; the
            # mismatched (KL) sequences depend on the batch's composition and are always scored live
            reference = batch.reference_logps if batch.reference_logps is not None else \
                sequence_logps(self.reference, batch.sequences)
            reference_kl = sequence_logps(self.reference, batch.kl_sequences)
        logps = UnpairedLogps(policy=policy, reference=reference, labels=batch.labels,
                              policy_kl=policy_kl, reference_kl=reference_kl)
        out = self.loss_fn(logps, self.params)
        loss = out.losses.mean()
        return loss, {"train/loss": loss.item(), **preference_metrics(out, logps, prefix="train/")}

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> None:
        evaluate_and_record(step, self.strategy, self.policy, self.reference, self.inputs.tokenizer,
                            self.inputs.eval_prompt_ids, self.inputs.gold, self.eval_cfg, self.inputs.identity,
                            self.points, self.logger, self.run_dir, self.meter)
