"""Reward-model training (Bradley–Terry on preference pairs) and reward normalisation for PPO.

Loss (Bradley & Terry 1952; Ouyang et al. 2022; TRL 1.16 RewardTrainer): `-logσ(r_c − r_r − margin) + c·mean((r_c + r_r)²)`,
from `rlhf_lab.algos.reward.bradley_terry_loss`. Each micro-batch is ONE forward pass over 2B rows built by
`collate_pairs` (rows [0, B) chosen, [B, 2B) rejected); the reward is read at each row's last real token
(`models.heads.sequence_scores`). Accuracy = mean(r_c > r_r), ties counting as wrong (as in the loss's stats).

After training, `fit_normalization` scores SFT samples and fits gain/bias so they have mean 0 and std 1 under
the RM (PPO detail 6); the PPO loop applies `algos.reward.normalize_rewards(score, gain, bias)`.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_lab.algos.reward import bradley_terry_loss, fit_reward_normalization
from rlhf_lab.config import OptimConfig, RewardModelConfig
from rlhf_lab.data.batches import SequenceBatch, TokenizedPair
from rlhf_lab.data.collate import batches, collate_pairs
from rlhf_lab.models.heads import sequence_scores
from rlhf_lab.trainers.loop import (GlobalBatches, ResumableLoop, accumulate, build_trained, micro_batch_for,
                                    rank_share)

log = logging.getLogger(__name__)

LOG_EVERY = 10                  # training metrics go to log_fn every N optimizer steps (and at the last step)
TRAIN_ACCURACY_MAX_PAIRS = 2048  # train accuracy is measured on at most this many train pairs (a seeded subset)
EVAL_BATCH_PAIRS = 64           # pairs per no-grad scoring pass


def validate_reward_config(cfg: RewardModelConfig) -> None:
    """The reward-model keys' ranges (ConfigError naming the key); run configs are checked at start-up already."""
    from rlhf_lab.config import validate_reward_model

    validate_reward_model(cfg)


# ---------------------------------------------------------------------------------------------------- training
def train_reward_model(model, tokenizer, train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair],
                       cfg: RewardModelConfig, strategy, seed: int, margins: dict[int, float] | None = None,
                       log_fn: Callable[[dict, int], None] | None = None, optim: OptimConfig | None = None,
                       checkpoint_dir: Path | None = None, checkpoint_every: int = 50, config_hash: str = "") -> dict:
    """Train `model` (a scalar model from `models.heads`) in place for cfg.steps optimizer steps; return metrics.

    margins: pair index (TokenizedPair.index) -> required reward gap; used only when cfg.use_margin (a warning is
    logged when use_margin is set but no margins were given). Each optimizer step sees cfg.batch_size pairs over
    all ranks, each rank strategy.grad_accum micro-batches of its share. The strategy's clipping is set to
    cfg.max_grad_norm; the optimizer is optim.name (default AdamW) with reward_model.lr / weight_decay. With
    `checkpoint_dir`, checkpoints every `checkpoint_every` steps (and on SIGTERM/SIGUSR1) and resumes.
    Returned keys: train_loss/train_batch_accuracy (last step), eval_accuracy/eval_loss (held-out, before:
    initial_eval_*), train_accuracy (subset of ≤ TRAIN_ACCURACY_MAX_PAIRS train pairs), steps, train_pairs,
    eval_pairs, seconds, history (logged steps).
    """
    margins = _checked_margins(cfg, strategy.grad_accum, train_pairs, margins)
    pad_id, device = tokenizer.pad_token_id, strategy.device
    strategy.max_grad_norm = cfg.max_grad_norm
    model = build_trained(strategy, model, optim or OptimConfig(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                          warmup_steps=cfg.warmup_steps)

    def evaluate(pairs):
        with strategy.autocast(), strategy.generation(model) as module:
            return evaluate_reward_model(module, pairs, pad_id, device=device)

    def loss_fn(items):
        loss, stats = pair_loss(model, items, pad_id, device, margins, cfg.center_rewards_coefficient)
        return loss, {"rm/loss": loss.item(), **{f"rm/{k}": float(v) for k, v in stats.items()}}

    generator = torch.Generator().manual_seed(seed)
    batches = GlobalBatches(list(train_pairs), cfg.batch_size, generator)
    loop = ResumableLoop(checkpoint_dir, strategy, config_hash, checkpoint_every, {"data": generator}, batches,
                         "reward model training", cfg.steps)
    start, extras = loop.start()
    if not extras:
        extras = {"initial": evaluate(eval_pairs) if eval_pairs else {}, "history": [], "last": {}}
    started = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        model.train()
        extras["last"] = totals = accumulate(strategy, rank_share(batches.next(), strategy.grad_accum), loss_fn, "rm")
        if step % LOG_EVERY == 0 or step == cfg.steps:
            totals["rm/pairs_per_s"] = (step - start) * cfg.batch_size / (time.perf_counter() - started)
            extras["history"].append({"step": step, **totals})
            log.info("rm step %d/%d: loss %.4f, batch accuracy %.3f", step, cfg.steps, totals["rm/loss"],
                     totals["rm/accuracy"])
            if log_fn is not None:
                log_fn(dict(totals), step)
        loop.after_step(step, extras)
    loop.close()
    model.eval()
    metrics = _final_metrics(evaluate, train_pairs, eval_pairs, cfg, seed, extras, margins is not None,
                             time.perf_counter() - started, strategy.describe()["world_size"])
    if log_fn is not None:
        log_fn({f"rm/{k}": v for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}, cfg.steps)
    return metrics


def _checked_margins(cfg: RewardModelConfig, accum: int, train_pairs, margins):
    validate_reward_config(cfg)
    micro_batch_for(cfg.batch_size, accum, "reward_model.batch_size")  # checks the division
    if len(train_pairs) < cfg.batch_size:
        raise ValueError(f"only {len(train_pairs)} training pairs for a batch of {cfg.batch_size} pairs")
    if cfg.use_margin and margins is None:
        log.warning("reward_model.use_margin is set but the pairs carry no scores: training without a margin")
    margins = margins if cfg.use_margin else None
    if margins is not None:
        missing = [p.index for p in train_pairs if p.index not in margins]
        if missing:
            raise ValueError(f"no margin for {len(missing)} training pairs (e.g. rows {missing[:5]})")
    return margins


def _final_metrics(evaluate, train_pairs, eval_pairs, cfg: RewardModelConfig, seed: int, extras: dict,
                   margin_used: bool, seconds: float, world_size: int) -> dict:
    final = evaluate(eval_pairs) if eval_pairs else {}
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    train_subset = [train_pairs[i] for i in sorted(order[:TRAIN_ACCURACY_MAX_PAIRS])]
    train_eval = evaluate(train_subset)
    initial, last = extras["initial"], extras["last"]
    log.info("reward model: held-out accuracy %s (was %s), train accuracy %.3f", _fmt(final.get("accuracy")),
             _fmt(initial.get("accuracy")), train_eval["accuracy"])
    return {
        "steps": cfg.steps, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "seconds": seconds,
        "train_loss": last.get("rm/loss"), "train_batch_accuracy": last.get("rm/accuracy"),
        "train_accuracy": train_eval["accuracy"], "train_accuracy_pairs": len(train_subset),
        "eval_accuracy": final.get("accuracy"), "eval_loss": final.get("loss"),
        "eval_margin": final.get("margin"),
        "initial_eval_accuracy": initial.get("accuracy"), "initial_eval_loss": initial.get("loss"),
        "margin_used": margin_used, "history": extras["history"], "world_size": world_size,
    }


def pair_loss(model, items: Sequence[TokenizedPair], pad_id: int, device, margins: dict[int, float] | None,
              center_rewards_coefficient: float | None) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry loss of one micro-batch: one forward pass over its 2B rows (chosen then rejected)."""
    batch = collate_pairs(items, pad_id).to(device)
    scores = sequence_scores(model, batch.sequences)
    b = batch.num_pairs
    margin = None
    if margins is not None:
        margin = torch.tensor([margins[int(i)] for i in batch.indices.tolist()], dtype=scores.dtype, device=device)
    return bradley_terry_loss(scores[:b], scores[b:], margin=margin,
                              center_rewards_coefficient=center_rewards_coefficient)


# ---------------------------------------------------------------------------------------------------- data
def split_pairs_by_prompt(pairs: Sequence[TokenizedPair], eval_fraction: float, seed: int
                          ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train, held-out): whole prompts are held out (all pairs of a prompt on one side, so held-out completions
    were never seen in training), chosen in a seeded random order until ≥ eval_fraction of the pairs are held out.
    Both sides keep the input order. eval_fraction = 0 holds nothing out; at least one prompt stays in train."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(tuple(p.prompt_ids), []).append(i)
    keys = list(groups)
    target = math.ceil(eval_fraction * len(pairs))
    held: set[int] = set()
    if target > 0 and len(keys) > 1:
        for k in torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()[:-1]:
            if len(held) >= target:
                break
            held.update(groups[keys[k]])
    train = [p for i, p in enumerate(pairs) if i not in held]
    return train, [p for i, p in enumerate(pairs) if i in held]


def margins_from_records(records: Sequence[dict]) -> dict[int, float] | None:
    """Row -> chosen_score − rejected_score (the gold gap written by preference generation), or None unless every
    row carries both scores as numbers."""
    out = {}
    for row, rec in enumerate(records):
        c, r = rec.get("chosen_score"), rec.get("rejected_score")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (c, r)):
            return None
        out[row] = float(c) - float(r)
    return out


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_reward_model(model, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = EVAL_BATCH_PAIRS,
                          device=None) -> dict:
    """Pairwise accuracy mean(r_c > r_r), BT loss −logσ(r_c − r_r) (no margin), mean margin and mean rewards."""
    if not pairs:
        raise ValueError("evaluate_reward_model: no pairs")
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for chunk in batches(list(pairs), batch_size):
        batch = collate_pairs(chunk, pad_id).to(device)
        scores = sequence_scores(model, batch.sequences).float().cpu()
        chosen.append(scores[: len(chunk)])
        rejected.append(scores[len(chunk):])
    model.train(was_training)
    c, r = torch.cat(chosen).double(), torch.cat(rejected).double()
    return {
        "accuracy": float((c > r).double().mean()), "loss": float(-F.logsigmoid(c - r).mean()),
        "margin": float((c - r).mean()), "chosen_mean": float(c.mean()), "rejected_mean": float(r.mean()),
        "pairs": len(pairs),
    }


# ---------------------------------------------------------------------------------------------------- normalisation
@torch.no_grad()
def score_sequences(model, seqs: SequenceBatch, batch_size: int = 128) -> torch.Tensor:
    """Scores of every row of `seqs` (read at the last real token), in no-grad chunks: (N,) float32 on CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(seqs), batch_size):
        out.append(sequence_scores(model, _rows(seqs, start, start + batch_size).to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def fit_normalization(model, seqs: SequenceBatch, batch_size: int = 128,
                      fitted_on: str | None = None) -> dict:
    """Score SFT samples and fit gain/bias so that gain·score + bias has mean 0 and std 1 on them (PPO detail 6).

    Returns {gain, bias, fitted_on, num_samples, raw_mean, raw_std} — the dict `save_scalar_model` stores.
    """
    scores = score_sequences(model, seqs, batch_size)
    gain, bias = fit_reward_normalization(scores)
    n = int(scores.numel())
    return {
        "gain": gain, "bias": bias, "fitted_on": fitted_on or f"{n} sequences", "num_samples": n,
        "raw_mean": float(scores.double().mean()), "raw_std": float(scores.double().std(unbiased=False)),
    }


def _rows(seqs: SequenceBatch, start: int, end: int) -> SequenceBatch:
    """Rows [start, end), with completion columns that are padding in every kept row trimmed off."""
    mask = seqs.completion_mask[start:end]
    width = int(mask.sum(-1).max().item()) if mask.numel() else 0
    keep = seqs.prompt_width + max(width, 1 if seqs.completion_width else 0)
    return replace(seqs, input_ids=seqs.input_ids[start:end, :keep],
                   attention_mask=seqs.attention_mask[start:end, :keep],
                   completion_mask=mask[:, : keep - seqs.prompt_width])


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
