"""Oracle judge: prefers the response with the higher gold (task) reward, optionally through Bradley–Terry noise.

With `noise_temperature` T > 0, A wins with probability sigmoid((r_A - r_B) / T): a simulated noisy annotator
(the same model `preferences.label_noise_temperature` uses for training labels). Each comparison draws from its
own stream seeded by (seed, prompt, A, B), so a verdict does not depend on what else is judged or in what order.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from rlhf_lab.judges.base import Comparison, Judge, OnResult, Verdict
from rlhf_lab.judges.config import OracleJudgeConfig
from rlhf_lab.utils.errors import DataError

# (prompts, completions) -> gold rewards, float array of shape (N,)
Scorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def gold_scorer(gold) -> Scorer:
    """Score with a rewards.gold.GoldReward (it reads the full text, prompt + completion)."""
    return lambda prompts, completions: np.asarray(gold.score([p + c for p, c in zip(prompts, completions)]),
                                                   dtype=np.float64)


class RecordScorer:
    """Gold rewards already computed at evaluation time (the samples files), looked up by (prompt, completion):
    exactly what the points table's gold_reward_mean averaged, with no gold model to load."""

    def __init__(self, records: Iterable[dict]):
        self.table: dict[tuple[str, str], float] = {}
        for r in records:
            self.table[(r["prompt"], r["completion"])] = float(r["gold"])

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        try:
            return np.array([self.table[(p, c)] for p, c in zip(prompts, completions)], dtype=np.float64)
        except KeyError as e:
            raise DataError(f"oracle judge: no gold score recorded for prompt/completion {e.args[0]!r}") from None


class OracleJudge(Judge):
    def __init__(self, scorer: Scorer, cfg: OracleJudgeConfig, scorer_id: str = "gold"):
        self.scorer, self.cfg, self.name, self.scorer_id = scorer, cfg, cfg.name, scorer_id

    def identity(self) -> str:
        return f"oracle|{self.scorer_id}|T={self.cfg.noise_temperature}|seed={self.cfg.seed}"

    @property
    def template_hash(self) -> str:
        return "none"

    def judge_many(self, items: Sequence[Comparison], on_result: OnResult | None = None) -> list[Verdict]:
        prompts = [it.prompt for it in items]
        r_a = self.scorer(prompts, [it.response_a for it in items])
        r_b = self.scorer(prompts, [it.response_b for it in items])
        out = []
        for i, (item, a, b) in enumerate(zip(items, r_a, r_b)):
            verdict = self._verdict(item, float(a), float(b))
            if on_result is not None:
                on_result(i, verdict)
            out.append(verdict)
        return out

    def _verdict(self, item: Comparison, r_a: float, r_b: float) -> Verdict:
        raw = json.dumps({"r_A": r_a, "r_B": r_b})
        if not (math.isfinite(r_a) and math.isfinite(r_b)):
            return Verdict("invalid", "", raw, error="non-finite gold reward")
        t = self.cfg.noise_temperature
        if t == 0:
            winner = "tie" if r_a == r_b else ("A" if r_a > r_b else "B")
            return Verdict(winner, f"gold {r_a:.4f} vs {r_b:.4f}", raw)
        p_a = 1.0 / (1.0 + math.exp(-(r_a - r_b) / t))
        u = self._uniform(item)
        return Verdict("A" if u < p_a else "B", f"gold {r_a:.4f} vs {r_b:.4f}, P(A)={p_a:.3f}", raw)

    def _uniform(self, item: Comparison) -> float:
        digest = hashlib.sha256(json.dumps([self.cfg.seed, item.prompt, item.response_a, item.response_b]).encode())
        return np.random.default_rng(int.from_bytes(digest.digest()[:8], "little")).random()
