"""Tokenisation of rendered (prompt, completion) text with a length policy.

Conventions (the same as TRL's DPO/KTO tokenisation, so numbers are comparable):
- prompt and completions are tokenised separately, without special tokens, so the prompt/completion boundary
  is exact (the completion mask never has to be recovered from offsets);
- a BOS token is prepended to the prompt only when the tokenizer itself adds one by default — i.e. when
  `tokenizer(text)` starts with bos but `tokenizer(text, add_special_tokens=False)` does not (Llama-style).
  This mirrors what the model saw in pre-training; GPT-2-style tokenizers (bos == eos, never added) get none.
  It is skipped when the prompt already starts with bos (chat templates often render it as text).
  Use `encode_prompt` anywhere else prompts are tokenised (sampling, evaluation) to stay consistent;
- eos_token_id is appended to every completion: the policy learns to stop, and eos is scored.

Length policy (TruncationConfig): lengths are counted in tokens including bos (prompt) and eos (completion).
"truncate" keeps the END of the prompt (the text nearest the completion; bos stays in front) and the START
of the completion; a truncated completion loses its eos, so it is not taught to stop where it was cut.
"drop" skips any pair/example that would need truncation. Both are counted in the SkipReport.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_lab.data.batches import SkipReport, TokenizedPair, TokenizedUnpaired
from rlhf_lab.data.formats import PreferencePair, UnpairedExample
from rlhf_lab.utils.errors import DataError

TRUNCATION_POLICIES = ("truncate", "drop")


@dataclass
class TruncationConfig:
    max_prompt_length: int = 64  # tokens, bos included; longer prompts keep their end
    max_completion_length: int = 64  # tokens, eos included; longer completions keep their start
    policy: str = "truncate"  # "truncate" | "drop"

    def __post_init__(self) -> None:
        if self.policy not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation policy {self.policy!r} is not one of {list(TRUNCATION_POLICIES)}")
        for name in ("max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_special_tokens(tokenizer: Any) -> None:
    """Raise ValueError unless eos is set and pad is set and differs from eos."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token_id: completions end with eos so the policy learns to stop"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"the tokenizer's pad_token_id ({tokenizer.pad_token_id}) must be set and differ from eos_token_id "
            f"({tokenizer.eos_token_id}): padding must be distinguishable from EOS, because completions end in a "
            "scored eos and sampled completions are cut at their first eos — with pad == eos a padded sequence "
            "looks like one that ended (and generate() masks real eos tokens as padding). "
            "Add a dedicated pad token (e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize "
            "the model's embeddings)."
        )


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends bos by default (its pre-training convention); see module docstring."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def encode_prompt(tokenizer: Any, text: str, bos: bool | None = None) -> list[int]:
    """Prompt token ids exactly as the training data gets them (bos per `adds_bos`, no other specials)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _with_bos(ids, tokenizer.bos_token_id, adds_bos(tokenizer) if bos is None else bos)


def _with_bos(ids: list[int], bos_id: int | None, add: bool) -> list[int]:
    if add and (not ids or ids[0] != bos_id):
        return [bos_id] + list(ids)
    return list(ids)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _fit_prompt(ids: list[int], limit: int, has_bos: bool) -> list[int]:
    """Keep the end of the prompt; a leading bos stays in front."""
    if len(ids) <= limit:
        return ids
    if has_bos and limit > 1:
        return ids[:1] + ids[len(ids) - (limit - 1) :]
    return ids[len(ids) - limit :]


class _Tokenizer:
    """Shared state of one tokenize_* call: the tokenizer's conventions and the length policy."""

    def __init__(self, tokenizer: Any, trunc: TruncationConfig):
        check_special_tokens(tokenizer)
        self.trunc = trunc
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self.add_bos = adds_bos(tokenizer)

    def prompt(self, ids: list[int], report: SkipReport, row: int) -> tuple[list[int] | None, bool]:
        """(ids, truncated) or (None, False) after recording a skip."""
        ids = _with_bos(ids, self.bos, self.add_bos)
        if not ids:
            report.skip("empty prompt: no token to condition the first completion token on", row)
            return None, False
        limit = self.trunc.max_prompt_length
        if len(ids) <= limit:
            return ids, False
        if self.trunc.policy == "drop":
            report.skip(f"prompt longer than max_prompt_length={limit}", row)
            return None, False
        has_bos = self.add_bos and ids[0] == self.bos
        return _fit_prompt(ids, limit, has_bos), True

    def completion(
        self, ids: list[int], what: str, report: SkipReport, row: int
    ) -> tuple[list[int] | None, bool]:
        if not ids:
            report.skip(f"{what} is empty after tokenisation", row)
            return None, False
        ids = ids + [self.eos]
        limit = self.trunc.max_completion_length
        if len(ids) <= limit:
            return ids, False
        if self.trunc.policy == "drop":
            report.skip(f"{what} longer than max_completion_length={limit} (eos included)", row)
            return None, False
        return ids[:limit], True


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    trunc: TruncationConfig | None = None,
    source: str = "pairs",
) -> tuple[list[TokenizedPair], SkipReport]:
    """Tokenise preference pairs; skips/truncations are counted in the returned SkipReport (named `source`).

    TokenizedPair.index is the pair's source row (PreferencePair.row), the key of the reference log-prob cache.
    Truncation counts: truncated["prompt"], ["chosen"], ["rejected"] (one per pair that needed it).
    """
    trunc = trunc or TruncationConfig()
    tok = _Tokenizer(tokenizer, trunc)
    report = SkipReport(source=source, total_rows=len(pairs))
    prompts = _encode(tokenizer, [p.prompt for p in pairs])
    chosens = _encode(tokenizer, [p.chosen for p in pairs])
    rejecteds = _encode(tokenizer, [p.rejected for p in pairs])

    out = []
    for pair, p_ids, c_ids, r_ids in zip(pairs, prompts, chosens, rejecteds):
        row = pair.row
        p_ids, p_cut = tok.prompt(p_ids, report, row)
        if p_ids is None:
            continue
        c_ids, c_cut = tok.completion(c_ids, "chosen", report, row)
        if c_ids is None:
            continue
        r_ids, r_cut = tok.completion(r_ids, "rejected", report, row)
        if r_ids is None:
            continue
        if c_ids == r_ids:
            report.skip("chosen identical to rejected after tokenisation/truncation", row)
            continue
        for what, cut in (("prompt", p_cut), ("chosen", c_cut), ("rejected", r_cut)):
            if cut:
                report.truncate(what)
        out.append(TokenizedPair(prompt_ids=p_ids, chosen_ids=c_ids, rejected_ids=r_ids, index=row))
    _check_not_all_skipped(out, report)
    return out, report


def tokenize_unpaired(
    examples: Sequence[UnpairedExample],
    tokenizer: Any,
    trunc: TruncationConfig | None = None,
    source: str = "unpaired",
) -> tuple[list[TokenizedUnpaired], SkipReport]:
    """Tokenise KTO examples; truncation counts: truncated["prompt"], ["completion"]."""
    trunc = trunc or TruncationConfig()
    tok = _Tokenizer(tokenizer, trunc)
    report = SkipReport(source=source, total_rows=len(examples))
    prompts = _encode(tokenizer, [e.prompt for e in examples])
    completions = _encode(tokenizer, [e.completion for e in examples])

    out = []
    for ex, p_ids, c_ids in zip(examples, prompts, completions):
        p_ids, p_cut = tok.prompt(p_ids, report, ex.row)
        if p_ids is None:
            continue
        c_ids, c_cut = tok.completion(c_ids, "completion", report, ex.row)
        if c_ids is None:
            continue
        if p_cut:
            report.truncate("prompt")
        if c_cut:
            report.truncate("completion")
        out.append(
            TokenizedUnpaired(prompt_ids=p_ids, completion_ids=c_ids, label=bool(ex.label), index=ex.row)
        )
    _check_not_all_skipped(out, report)
    return out, report


def _check_not_all_skipped(out: list, report: SkipReport) -> None:
    if report.total_rows and not out:
        raise DataError(f"{report.source}: every row was skipped during tokenisation — {report.summary()}")
