"""Who decides which of two completions is preferred, behind one interface: the task's gold reward, the learned
reward model, or a judge preset (AI feedback: RLAIF, Bai et al. 2022; Lee et al. 2023). Online DPO labels its
own samples with one every step (Guo et al. 2024); the preference stage can relabel its pairs with one.

An annotator is named by a spec string, validated at start-up (`check_annotator_spec`):

    gold               the task's gold reward (the oracle the frontier is measured with)
    reward_model       the learned reward model (trained on gold-labelled pairs)
    judge:<preset>     a judge from conf/judge/<preset>.yaml (oracle, smollm2, openai, ...)
    callable:<module>:<function>   any Python scorer (prompts, completions) -> scores, higher preferred

Ties and invalid verdicts are never guessed: they come back undecided, counted, and the caller drops the pair.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from rlhf_lab.utils.errors import ConfigError

ANNOTATOR_KINDS = ("gold", "reward_model", "judge:<preset>", "callable:<module>:<function>")


@dataclass
class PairLabels:
    first_wins: torch.Tensor          # (B,) bool: the first completion is preferred (meaningful where decided)
    decided: torch.Tensor             # (B,) bool: False for ties and invalid verdicts (those pairs are dropped)
    ties: int
    invalid: int
    margin: Optional[torch.Tensor] = None  # (B,) float64 score(first) − score(second) for score annotators

    @property
    def num_decided(self) -> int:
        return int(self.decided.sum())


class Annotator(Protocol):
    name: str

    def label(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str], first_seqs=None,
              second_seqs=None) -> PairLabels:
        """Which of `first[i]`, `second[i]` (completions of `prompts[i]`) is preferred. `*_seqs`: the policy's
        token batches (data.batches.SequenceBatch) of the same rows when there are any, else None."""


def labels_from_scores(first: torch.Tensor, second: torch.Tensor) -> PairLabels:
    """Higher score wins; equal scores are ties; a non-finite score makes the pair invalid."""
    first, second = first.double(), second.double()
    finite = torch.isfinite(first) & torch.isfinite(second)
    tie = finite & (first == second)
    return PairLabels(first_wins=first > second, decided=finite & ~tie, ties=int(tie.sum()),
                      invalid=int((~finite).sum()), margin=torch.where(finite, first - second, torch.nan))


class ScoreAnnotator:
    """Prefers the completion a reward source (rewards/source.py: gold or learned) scores higher."""

    def __init__(self, source, name: str):
        self.source, self.name = source, name

    def label(self, prompts, first, second, first_seqs=None, second_seqs=None) -> PairLabels:
        """`*_seqs`: the policy's token batches of the same rows, which a learned reward model with the
        policy's tokenizer scores without re-tokenising."""
        return labels_from_scores(self.source.score(prompts, first, first_seqs),
                                  self.source.score(prompts, second, second_seqs))


class JudgeAnnotator:
    """Asks a pairwise judge, in both presentation orders: a verdict that flips with the order is a tie (position
    bias cancels; judges/winrate.combine_orders), an invalid answer in both orders is invalid. `cache`: a
    judges.cache.VerdictCache, so verdicts already paid for are never asked again (None: no cache)."""

    def __init__(self, judge, name: str, both_orders: bool = True, cache=None):
        self.judge, self.name, self.both_orders, self.cache = judge, name, both_orders, cache

    def label(self, prompts, first, second, first_seqs=None, second_seqs=None) -> PairLabels:
        from rlhf_lab.judges.evaluate import judge_pairs

        outcomes = judge_pairs(self.judge, prompts, first, second, cache=self.cache,
                               both_orders=self.both_orders).outcomes
        outcomes = torch.from_numpy(np.asarray(outcomes, dtype=np.float64))
        invalid, tie = torch.isnan(outcomes), outcomes == 0.5
        return PairLabels(first_wins=outcomes == 1.0, decided=~invalid & ~tie, ties=int(tie.sum()),
                          invalid=int(invalid.sum()))


def check_annotator_spec(spec: str, key: str, check_credentials: bool = False) -> None:
    """Fail at start-up on a spec that names nothing (the judge preset must exist) and, with
    `check_credentials`, on an API judge whose key is not where its preset says (not after hours of stages)."""
    from rlhf_lab.judges.config import PRESET_DIR, OpenAIJudgeConfig, load_judge_preset

    if spec in ("gold", "reward_model"):
        return
    kind, _, preset = spec.partition(":")
    if kind == "callable":
        from rlhf_lab.rewards.source import load_callable

        load_callable(preset, key)
        return
    if kind != "judge" or not preset:
        raise ConfigError(f"config key '{key}': expected one of {' | '.join(ANNOTATOR_KINDS)}, got {spec!r}")
    if not (PRESET_DIR / f"{preset}.yaml").is_file():
        valid = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"config key '{key}': no judge preset {preset!r} (valid: {valid})")
    cfg = load_judge_preset(preset) if check_credentials else None
    if isinstance(cfg, OpenAIJudgeConfig) and cfg.api_key_required:
        from rlhf_lab.judges.openai_judge import resolve_api_key

        try:
            resolve_api_key(cfg)   # the key itself is not kept
        except ConfigError as e:
            raise ConfigError(f"config key '{key}'={spec}: {e}") from None


def build_annotator(spec: str, gold=None, reward_model=None, judge_cache=None) -> Annotator:
    """The annotator a spec names. `gold`: the task's rewards.gold.GoldReward (also what the oracle judge
    reads); `reward_model`: a rewards.source.LearnedRewardSource, needed by spec 'reward_model';
    `judge_cache`: a judges.cache.VerdictCache for a judge's verdicts (None: none)."""
    from rlhf_lab.rewards.source import GoldRewardSource

    if spec == "gold":
        if gold is None:
            raise ConfigError("annotator 'gold' needs a task with a gold reward (task=imdb)")
        return ScoreAnnotator(GoldRewardSource(gold), f"gold:{gold.name}")
    if spec == "reward_model":
        if reward_model is None:
            raise ConfigError("annotator 'reward_model' needs the learned reward model (its stage did not run)")
        return ScoreAnnotator(reward_model, "reward_model")
    kind, _, preset = spec.partition(":")
    if kind == "callable":
        from rlhf_lab.rewards.source import CallableRewardSource

        return ScoreAnnotator(CallableRewardSource(preset, "algo.annotator"), spec)
    from rlhf_lab.judges.config import load_judge_preset
    from rlhf_lab.judges.evaluate import build_judge
    from rlhf_lab.judges.oracle import gold_scorer

    cfg = load_judge_preset(preset)
    scorer = None if gold is None else gold_scorer(gold)
    return JudgeAnnotator(build_judge(cfg, scorer=scorer, scorer_id=getattr(gold, "name", "gold")), spec,
                          cache=judge_cache)


def agreement(labels: PairLabels, reference: PairLabels) -> tuple[float, int]:
    """Share of pairs both annotators decided on which they pick the same completion, and how many that is."""
    both = labels.decided & reference.decided
    n = int(both.sum())
    if n == 0:
        return float("nan"), 0
    return float((labels.first_wins[both] == reference.first_wins[both]).double().mean()), n
