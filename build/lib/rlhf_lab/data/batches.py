"""Typed containers that travel from the collators to the models and losses.

Layout of every token batch (why: completions always occupy the last C positions, so the policy only has
to project those positions through the LM head — `logits_to_keep=C+1` — and the same code path serves
training, reference caching and evaluation):

    input_ids   [ pad pad p1 p2 p3 | c1 c2 c3 eos pad pad ]
                  <- prompt, left-padded to P -> <- completion, right-padded to C ->

The token at completion position j (input index P+j) is predicted by the logits at input index P+j-1.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor        # (N, P + C) long: left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor   # (N, P + C) long: 1 on real tokens (prompt and completion), 0 on padding
    completion_mask: torch.Tensor  # (N, C) float: 1 on real completion tokens (these are scored), 0 on padding
    prompt_width: int              # P: number of prompt columns (including left padding)

    @property
    def completion_width(self) -> int:
        return self.input_ids.shape[1] - self.prompt_width

    @property
    def completion_ids(self) -> torch.Tensor:  # (N, C)
        return self.input_ids[:, self.prompt_width:]

    @property
    def position_ids(self) -> torch.Tensor:  # (N, P + C): positions count real tokens only (left padding → 0)
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def completion_lengths(self) -> torch.Tensor:  # (N,) number of real completion tokens, |y|
        return self.completion_mask.sum(-1)

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class PreferenceBatch:
    sequences: SequenceBatch                  # (2B, P + C): rows [0, B) chosen, rows [B, 2B) rejected (same prompts)
    indices: torch.Tensor                     # (B,) long: row index of each pair in its dataset (reference cache key)
    reference_logps: Optional[torch.Tensor] = None  # (2B,) float: cached Σ log π_ref over completion tokens, same row order

    @property
    def num_pairs(self) -> int:
        return self.indices.shape[0]

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        ref = None if self.reference_logps is None else self.reference_logps.to(device)
        return replace(self, sequences=self.sequences.to(device), indices=self.indices.to(device), reference_logps=ref)


@dataclass
class UnpairedBatch:
    """KTO's input: each row is one (prompt, completion) with a desirable/undesirable label."""

    sequences: SequenceBatch          # (B, P + C)
    labels: torch.Tensor              # (B,) bool: True = desirable
    kl_sequences: SequenceBatch       # (B, P + C'): prompt i with completion (i+1) mod B — KTO's z0 reference point
    indices: torch.Tensor             # (B,) long: row index in the dataset
    reference_logps: Optional[torch.Tensor] = None     # (B,) cached reference log-probs of `sequences`

    def to(self, device: torch.device | str) -> "UnpairedBatch":
        ref = None if self.reference_logps is None else self.reference_logps.to(device)
        return replace(
            self,
            sequences=self.sequences.to(device),
            labels=self.labels.to(device),
            kl_sequences=self.kl_sequences.to(device),
            indices=self.indices.to(device),
            reference_logps=ref,
        )


@dataclass
class TokenizedPair:
    """One preference pair after tokenisation (eos appended to both completions, truncation applied)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int                      # row index in the source dataset


@dataclass
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    index: int


@dataclass
class SkipReport:
    """Counts of rows dropped or altered, with reasons, so nothing is ever dropped silently."""

    source: str
    total_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)      # reason -> count of rows dropped
    truncated: dict[str, int] = field(default_factory=dict)    # what -> count of rows truncated
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first few row numbers

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < 5:
            rows.append(row)

    def truncate(self, what: str) -> None:
        self.truncated[what] = self.truncated.get(what, 0) + 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        kept = self.total_rows - self.num_skipped
        parts = [f"{self.source}: kept {kept}/{self.total_rows} rows"]
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"skipped {n} ({reason}; e.g. rows {self.examples.get(reason, [])})")
        for what, n in sorted(self.truncated.items()):
            parts.append(f"truncated {n} ({what})")
        return "; ".join(parts)
