"""Preference generation for tasks with a gold reward (DPO paper §6.1): k samples per prefix from the SFT model,
all k(k−1)/2 pairs labelled by the gold reward — deterministically, or by simulated Bradley–Terry annotators
with P(a ≻ b) = σ((r_a − r_b)/T). Exact ties are dropped and counted.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from rlhf_lab.config import PreferenceGenConfig
from rlhf_lab.data.formats import write_pairs_jsonl
from rlhf_lab.data.tokenize import encode_prompt
from rlhf_lab.models.sampling import sample_completions


def label_pairs(scores: np.ndarray, completions: list[str], noise_temperature: float,
                rng: np.random.Generator) -> tuple[list[tuple[int, int]], dict]:
    """(chosen, rejected) index pairs among one prompt's k samples; ties (equal score or equal text) dropped."""
    pairs, ties, flips = [], 0, 0
    for i, j in itertools.combinations(range(len(scores)), 2):
        if scores[i] == scores[j] or completions[i] == completions[j]:
            ties += 1
            continue
        better, worse = (i, j) if scores[i] > scores[j] else (j, i)
        if noise_temperature > 0:
            p_better = 1.0 / (1.0 + math.exp(-(scores[better] - scores[worse]) / noise_temperature))
            if rng.random() >= p_better:
                better, worse = worse, better
                flips += 1
        pairs.append((better, worse))
    return pairs, {"ties": ties, "flips": flips}


def generate_preferences(model, tokenizer, prompts: list[str], gold, cfg: PreferenceGenConfig, seed: int,
                         out_path: Path) -> dict:
    k = cfg.completions_per_prompt
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    repeated = [ids for ids in prompt_ids for _ in range(k)]
    generator = torch.Generator().manual_seed(seed)
    seqs = sample_completions(model, repeated, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              batch_size=cfg.batch_size, generator=generator, progress="preferences: sampling")
    completion_rows = [[t for t, m in zip(row, mask) if m] for row, mask in
                       zip(seqs.completion_ids.tolist(), seqs.completion_mask.tolist())]
    completions = tokenizer.batch_decode(completion_rows, skip_special_tokens=True)
    full_texts = [prompts[i // k] + c for i, c in enumerate(completions)]
    scores = np.asarray(gold.score(full_texts), dtype=np.float64)
    rng = np.random.default_rng(seed)
    rows, ties, flips, empty = [], 0, 0, 0
    for p, prompt in enumerate(prompts):
        block = slice(p * k, (p + 1) * k)
        texts, block_scores = completions[block], scores[block]
        pairs, counts = label_pairs(block_scores, texts, cfg.label_noise_temperature, rng)
        ties, flips = ties + counts["ties"], flips + counts["flips"]
        for c, r in pairs:
            if not texts[c].strip() or not texts[r].strip():
                empty += 1
                continue
            rows.append({"prompt": prompt, "chosen": texts[c], "rejected": texts[r],
                         "chosen_score": float(block_scores[c]), "rejected_score": float(block_scores[r])})
    if cfg.max_pairs is not None and len(rows) > cfg.max_pairs:
        keep = sorted(rng.choice(len(rows), size=cfg.max_pairs, replace=False).tolist())
        rows = [rows[i] for i in keep]
    write_pairs_jsonl(out_path, rows)
    return {
        "prompts": len(prompts), "samples": len(completions), "pairs_written": len(rows),
        "ties_dropped": ties, "empty_completion_pairs_dropped": empty, "label_flips": flips,
        "sft_gold_reward_mean": float(scores.mean()), "sft_gold_reward_std": float(scores.std()),
        "mean_completion_tokens": float(np.mean([len(r) for r in completion_rows])),
    }
