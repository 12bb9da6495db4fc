"""Judge policy-vs-baseline pairs through the verdict cache, in one or both presentation orders.

Only cache misses reach the judge; each new verdict is written to the cache the moment it arrives, so a rerun
costs nothing and an interrupted evaluation resumes where it stopped.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from rlhf_lab.judges.base import Comparison, Judge, Usage, Verdict
from rlhf_lab.judges.cache import VerdictCache, verdict_key
from rlhf_lab.judges.config import JudgeConfig
from rlhf_lab.judges.winrate import (
    agreement,
    combine_orders,
    length_controlled_win_rate,
    orient,
    position_bias_rate,
    summarize,
)

log = logging.getLogger(__name__)


@dataclass
class JudgedPairs:
    first: np.ndarray            # (N,) outcomes with the policy shown as A
    second: np.ndarray | None    # (N,) outcomes with the policy shown as B (None: one order only)
    outcomes: np.ndarray         # (N,) debiased outcomes (combine_orders), NaN = invalid
    verdicts: list[Verdict]      # every verdict, first order then second
    usage: Usage                 # requests / tokens spent by THIS call (cache hits cost nothing)
    cached: int                  # verdicts served from the cache


def judge_with_cache(judge: Judge, items: Sequence[Comparison], cache: VerdictCache | None) -> list[Verdict]:
    """Verdicts for `items` in order; misses are judged and stored one by one as they arrive."""
    if cache is None:
        return judge.judge_many(items)
    identity, template = judge.identity(), getattr(judge, "template_hash", "none")
    keys = [verdict_key(identity, template, item) for item in items]
    hits = cache.get_many(list(dict.fromkeys(keys)))
    todo = [i for i, k in enumerate(keys) if k not in hits]
    unique_todo = list({keys[i]: i for i in todo}.values())  # a repeated comparison is judged once
    log.info("judge %s: %d comparisons, %d cached, %d to judge", judge.name, len(items), len(items) - len(todo),
             len(unique_todo))
    fresh: dict[str, Verdict] = {}

    def store(j: int, verdict: Verdict) -> None:
        i = unique_todo[j]
        fresh[keys[i]] = verdict
        cache.put(keys[i], identity, template, items[i].order, verdict)

    if unique_todo:
        judge.judge_many([items[i] for i in unique_todo], on_result=store)
    out, seen = [], set()
    for k in keys:
        if k in hits:
            out.append(hits[k])
        elif k in seen:  # a duplicate of a comparison judged above: free this time
            out.append(replace(fresh[k], usage=Usage(), cached=True))
        else:
            seen.add(k)
            out.append(fresh[k])
    return out


def judge_pairs(judge: Judge, prompts: Sequence[str], policy: Sequence[str], baseline: Sequence[str],
                cache: VerdictCache | None, both_orders: bool = True) -> JudgedPairs:
    """Policy vs baseline on matched pairs; outcomes from the policy's side (see winrate.py)."""
    if not (len(prompts) == len(policy) == len(baseline)):
        raise ValueError(f"prompts/policy/baseline lengths differ: {len(prompts)}, {len(policy)}, {len(baseline)}")
    items = [Comparison(p, a, b, "ab") for p, a, b in zip(prompts, policy, baseline)]
    if both_orders:
        items += [Comparison(p, b, a, "ba") for p, a, b in zip(prompts, policy, baseline)]
    verdicts = judge_with_cache(judge, items, cache)
    n = len(prompts)
    first = orient([v.winner for v in verdicts[:n]], "A")
    second = orient([v.winner for v in verdicts[n:]], "B") if both_orders else None
    outcomes = combine_orders(first, second) if both_orders else first
    usage = sum((v.usage for v in verdicts if not v.cached), Usage())
    return JudgedPairs(first, second, outcomes, verdicts, usage, sum(v.cached for v in verdicts))


def win_rate_metrics(judge: Judge, judged: JudgedPairs, policy_len: np.ndarray, baseline_len: np.ndarray,
                     oracle: np.ndarray | None, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """One judge's summary of judged pairs: counts, win rate with bootstrap CI, length-controlled win rate,
    position-bias rate, agreement with `oracle` outcomes (NaN when None), usage and cost. Lengths: (N,) tokens."""
    s = summarize(judged.outcomes, n_boot, alpha, seed)
    bias = position_bias_rate(judged.first, judged.second) if judged.second is not None else math.nan
    return {
        "n": s.n, "wins": s.wins, "losses": s.losses, "ties": s.ties, "invalid": s.invalid, "win_rate": s.win_rate,
        "win_rate_ci_low": s.ci_low, "win_rate_ci_high": s.ci_high,
        "lc_win_rate": length_controlled_win_rate(judged.outcomes, policy_len, baseline_len),
        "position_bias_rate": bias,
        "agreement_with_oracle": math.nan if oracle is None else agreement(judged.outcomes, oracle)[0],
        "requests": judged.usage.requests, "tokens": judged.usage.tokens,
        "cost_usd": judge.usage_cost_usd(judged.usage), "cached": judged.cached,
    }


def build_judge(cfg: JudgeConfig, scorer=None, scorer_id: str = "gold") -> Judge:
    """The judge a config describes. `scorer` (prompts, completions) → gold rewards is needed by the oracle."""
    from rlhf_lab.judges.config import HFJudgeConfig, OpenAIJudgeConfig, OracleJudgeConfig
    from rlhf_lab.judges.templates import get_template

    if isinstance(cfg, OracleJudgeConfig):
        from rlhf_lab.judges.oracle import OracleJudge

        if scorer is None:
            raise ValueError(f"judge {cfg.name!r}: the oracle judge needs a gold scorer")
        return OracleJudge(scorer, cfg, scorer_id)
    template = get_template(cfg.template, cfg.custom_template)
    if isinstance(cfg, HFJudgeConfig):
        from rlhf_lab.judges.hf_judge import HFJudge

        return HFJudge.from_config(cfg, template)
    if isinstance(cfg, OpenAIJudgeConfig):
        from rlhf_lab.judges.openai_judge import OpenAIJudge

        return OpenAIJudge(cfg, template)
    raise TypeError(f"not a judge config: {type(cfg).__name__}")
