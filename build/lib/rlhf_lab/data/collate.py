"""Collators: tokenised items → typed batches in the layout documented in `batches.py`.

Every row is [left-padded prompt | right-padded completion], so completions occupy the last C columns in
every row; masks are built from the true lengths, never by comparing ids with pad_id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from rlhf_lab.data.batches import (
    PreferenceBatch,
    SequenceBatch,
    TokenizedPair,
    TokenizedUnpaired,
    UnpairedBatch,
)

T = TypeVar("T")


def collate_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
    min_widths: tuple[int, int] | None = None,
) -> SequenceBatch:
    """Prompts left-padded to P = longest prompt, completions right-padded to C = longest completion.

    min_widths=(P0, C0) pads to at least those widths: fixed shapes let a compiled model compile once."""
    if len(prompts) != len(completions):
        raise ValueError(f"collate_sequences: {len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("collate_sequences: empty batch")
    n = len(prompts)
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    if min_widths is not None:
        P, C = max(P, min_widths[0]), max(C, min_widths[1])
    input_ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + C), dtype=torch.long)
    completion_mask = torch.zeros((n, C), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if p:
            input_ids[i, P - len(p) : P] = torch.as_tensor(p, dtype=torch.long)
            attention_mask[i, P - len(p) : P] = 1
        if c:
            input_ids[i, P : P + len(c)] = torch.as_tensor(c, dtype=torch.long)
            attention_mask[i, P : P + len(c)] = 1
            completion_mask[i, : len(c)] = 1.0
    return SequenceBatch(
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask, prompt_width=P
    )


def collate_pairs(
    items: Sequence[TokenizedPair], pad_id: int, reference_logps: torch.Tensor | None = None,
    min_widths: tuple[int, int] | None = None,
) -> PreferenceBatch:
    """Rows [0, B) chosen, [B, 2B) rejected, same prompts; one policy forward pass scores both halves.

    reference_logps: optional (N_dataset, 2) table [chosen, rejected] indexed by TokenizedPair.index; the
    batch's rows are gathered into a (2B,) tensor in the batch's row order (all chosen, then all rejected).
    """
    if not items:
        raise ValueError("collate_pairs: empty batch")
    prompts = [it.prompt_ids for it in items]
    seqs = collate_sequences(
        prompts + prompts, [it.chosen_ids for it in items] + [it.rejected_ids for it in items], pad_id, min_widths
    )
    indices = torch.tensor([it.index for it in items], dtype=torch.long)
    ref = None
    if reference_logps is not None:
        if reference_logps.dim() != 2 or reference_logps.shape[1] != 2:
            raise ValueError(
                f"reference_logps must be an (N_dataset, 2) [chosen, rejected] table, got shape {tuple(reference_logps.shape)}"
            )
        rows = _gather_rows(reference_logps, indices)
        ref = torch.cat([rows[:, 0], rows[:, 1]])
    return PreferenceBatch(sequences=seqs, indices=indices, reference_logps=ref)


def collate_unpaired(
    items: Sequence[TokenizedUnpaired], pad_id: int, reference_logps: torch.Tensor | None = None
) -> UnpairedBatch:
    """KTO batch: sequences (prompt_i, completion_i) and kl_sequences (prompt_i, completion_{(i+1) mod B}).

    The mismatched pairs estimate KTO's reference point z0 = KL(π‖π_ref) on unrelated completions; with B = 1
    they would be the matched pair itself (the KL term would equal the implied reward), so B must be ≥ 2 —
    use drop_last=True or a batch size that avoids a final batch of one.
    reference_logps: optional (N_dataset,) table indexed by TokenizedUnpaired.index, gathered to (B,).
    Reference log-probs of kl_sequences depend on the batch composition and cannot be cached per row.
    """
    if len(items) < 2:
        raise ValueError(
            f"collate_unpaired: KTO needs at least 2 examples per batch to form mismatched KL pairs, got {len(items)}; "
            "use drop_last=True or a batch size that does not leave a final batch of one"
        )
    prompts = [it.prompt_ids for it in items]
    completions = [it.completion_ids for it in items]
    shifted = completions[1:] + completions[:1]  # completion (i+1) mod B
    indices = torch.tensor([it.index for it in items], dtype=torch.long)
    ref = None
    if reference_logps is not None:
        if reference_logps.dim() != 1:
            raise ValueError(
                f"reference_logps must be an (N_dataset,) table, got shape {tuple(reference_logps.shape)}"
            )
        ref = _gather_rows(reference_logps, indices)
    return UnpairedBatch(
        sequences=collate_sequences(prompts, completions, pad_id),
        labels=torch.tensor([bool(it.label) for it in items], dtype=torch.bool),
        kl_sequences=collate_sequences(prompts, shifted, pad_id),
        indices=indices,
        reference_logps=ref,
    )


def _gather_rows(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    n = table.shape[0]
    if int(indices.max()) >= n or int(indices.min()) < 0:
        raise ValueError(
            f"reference_logps table has {n} rows but the batch needs row {int(indices.max())}: "
            "the reference cache does not match this dataset (rebuild it)"
        )
    return table[indices.to(table.device)]


def batches(
    items: Sequence[T],
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[list[T]]:
    """Yield lists of items; the order is a torch.randperm of `generator` when shuffling (deterministic per seed)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(items)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else range(n)
    order = list(order)
    for start in range(0, n, batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield [items[i] for i in chunk]
