"""Supervised fine-tuning on plain text (the embedded task: IMDb reviews): next-token cross-entropy."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_lab.config import OptimConfig, SFTConfig
from rlhf_lab.trainers.loop import (GlobalBatches, ResumableLoop, accumulate, build_trained, micro_batch_for,
                                    rank_share)

log = logging.getLogger(__name__)


def tokenize_texts(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Each text truncated to `seq_len` tokens; texts that end within the window get an EOS (so models learn to stop)."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids[:seq_len] if len(ids) >= seq_len else ids + [tokenizer.eos_token_id] for ids in encoded if ids]


def lm_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) input ids and a (N, T) mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over real target tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets, target_mask = ids[:, 1:], mask[:, 1:].float()
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(target_mask) * target_mask).sum() / target_mask.sum()


def train_sft(model, tokenizer, texts: list[str], cfg: SFTConfig, strategy, seed: int, optim: OptimConfig,
              log_fn=None, checkpoint_dir: Path | None = None, checkpoint_every: int = 50, config_hash: str = ""):
    """Train `model` for cfg.steps optimizer steps on random batches of `texts` (cfg.batch_size sequences per step
    over all ranks, each rank its share); return the final loss (mean over ranks). The optimizer is optim.name
    with sft.lr / sft.weight_decay / sft.warmup_steps. With `checkpoint_dir`, checkpoints every
    `checkpoint_every` steps (and on SIGTERM/SIGUSR1) and resumes from the newest one."""
    rows = tokenize_texts(tokenizer, texts[: cfg.num_texts] if cfg.num_texts else texts, cfg.seq_len)
    if not rows:
        raise ValueError("SFT: no non-empty texts to train on")
    accum = strategy.grad_accum
    micro_batch_for(cfg.batch_size, accum, "sft.batch_size")
    model = build_trained(strategy, model, optim, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          warmup_steps=cfg.warmup_steps)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    batches = GlobalBatches(rows, cfg.batch_size, generator)
    loop = ResumableLoop(checkpoint_dir, strategy, config_hash, checkpoint_every, {"data": generator}, batches,
                         "sft training", cfg.steps)
    start, metrics = loop.start()
    pad_id, started = tokenizer.pad_token_id, time.time()

    def loss_fn(micro: list[list[int]]):
        ids, mask = (t.to(strategy.device) for t in lm_batch(micro, pad_id))
        loss = lm_loss(model, ids, mask)
        return loss, {"sft/loss": loss.item()}

    for step in range(start + 1, cfg.steps + 1):
        metrics = accumulate(strategy, rank_share(batches.next(), accum), loss_fn, "sft")
        if step % 50 == 0 or step == cfg.steps:
            metrics["sft/tokens_per_s"] = (step - start) * cfg.batch_size * cfg.seq_len / (time.time() - started)
            log.info("sft step %d/%d: loss %.3f (%.0f tokens/s)", step, cfg.steps, metrics["sft/loss"],
                     metrics["sft/tokens_per_s"])
            if log_fn is not None:
                log_fn(metrics, step)
        loop.after_step(step, metrics)
    loop.close()
    model.eval()
    return metrics["sft/loss"]
