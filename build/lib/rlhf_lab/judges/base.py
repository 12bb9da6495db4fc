"""The one pairwise judge interface: (prompt, response A, response B) → Verdict.

Every judge (oracle, local HF model, OpenAI-compatible API) answers in positions — "A" is whatever was shown
first — so position bias can be measured by judging both orders (winrate.py). A judge never raises on a bad
answer: it returns `winner="invalid"` with the reason in `error`, so one broken answer cannot lose a run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

WINNERS = ("A", "B", "tie", "invalid")


@dataclass(frozen=True)
class Usage:
    """What one verdict cost: requests sent and tokens billed (all zero for local judges and cache hits)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Comparison:
    """One judgement to make. `order` says which original response sits in position A ("ab": the first
    response of the pair, "ba": the swapped order); it is part of the cache key."""

    prompt: str
    response_a: str
    response_b: str
    order: str = "ab"


@dataclass(frozen=True)
class Verdict:
    winner: str                        # "A" | "B" | "tie" | "invalid" (positions, not responses)
    rationale: str = ""                # the judge's explanation (or the probabilities for the local judge)
    raw: str = ""                      # the judge's full raw output, kept for audit
    usage: Usage = field(default_factory=Usage)
    error: str = ""                    # why a verdict is invalid: "malformed", "transport: ...", "" when valid
    cached: bool = False               # served from the verdict cache (cost nothing this time)

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")

    @property
    def transient_failure(self) -> bool:
        """A transport failure (retries exhausted): not cached, so a rerun tries again."""
        return self.error.startswith("transport")


OnResult = Callable[[int, Verdict], None]


class Judge(ABC):
    """Subclasses set `name` and implement `identity()` and `judge_many()`."""

    name: str = "judge"

    @abstractmethod
    def identity(self) -> str:
        """A string that changes whenever the verdicts could change (model, decoding, noise): part of the cache
        key. It must never contain a secret."""

    @abstractmethod
    def judge_many(self, items: Sequence[Comparison], on_result: OnResult | None = None) -> list[Verdict]:
        """Judge every comparison; call `on_result(index, verdict)` as each finishes (so a caller can persist
        verdicts before the whole batch is done and an interrupted evaluation resumes)."""

    def judge(self, prompt: str, response_a: str, response_b: str) -> Verdict:
        return self.judge_many([Comparison(prompt, response_a, response_b)])[0]

    def close(self) -> None:
        """Release models / connections."""

    def usage_cost_usd(self, usage: Usage) -> float:
        """Estimated cost of `usage` (zero for free judges)."""
        return 0.0
