"""Who labels the DPO family's generated pairs, and which pairs it trains on (pure functions; the cached stages
that call them are in recipes/label_stages.py).

    preferences.labeler   gold (default: the pairs as generated) | reward_model | judge:<preset>
                          AI feedback (RLAIF: Bai et al. 2022; Lee et al. 2023): the annotator decides chosen /
                          rejected of every generated pair again; pairs it cannot decide (ties, invalid verdicts)
                          are dropped and counted.
    preferences.filter    none (default) | reward_model
    preferences.filter_margin
                          keep a pair only when the learned reward model prefers its chosen completion by more
                          than this margin, r(chosen) − r(rejected) > margin.

The filter is a static margin filter by the learned reward model: the simple, offline relative of filtered DPO
(fDPO, Morimura et al. 2024, "Filtered Direct Preference Optimization"), which instead drops, during training,
pairs whose chosen response the reward model scores below a response sampled from the policy being trained.
What is implemented here is the margin filter only; the arm is named "fdpo" for the family it belongs to.

Agreement with the gold reward is measured on the pairs both the labeller and the gold reward decide, with a 95%
bootstrap interval that resamples prompts (the pairs of one prompt share completions, so they are not
independent draws).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from rlhf_lab.rewards.annotators import PairLabels, labels_from_scores

FILTERS = ("none", "reward_model")
CLEAR_CUT_GOLD_GAP = 0.5     # |gold(chosen) − gold(rejected)| above this is a clear-cut pair (gold in [0, 1])
BOOTSTRAP_SAMPLES = 1000


def labels_apply(prefs, data_source: Optional[str]) -> bool:
    """Relabelling and filtering act on the generated pairs only: a user dataset (data.source) is used as is."""
    return data_source is None and (prefs.labeler != "gold" or prefs.filter != "none")


def uses_reward_model(prefs, data_source: Optional[str]) -> bool:
    """Whether the DPO family needs the learned reward model (trained on the gold-labelled pairs) for its pairs."""
    return data_source is None and "reward_model" in (prefs.labeler, prefs.filter)


def dpo_method(prefs, data_source: Optional[str]) -> str:
    """The points table's `method` of a DPO-family run: dpo (gold labels), fdpo (reward-model filtered), with
    '@<labeler>' when an annotator other than the gold reward labelled the pairs (dpo@judge:smollm2)."""
    if data_source is not None:
        return "dpo"
    base = "fdpo" if prefs.filter != "none" else "dpo"
    return base if prefs.labeler == "gold" else f"{base}@{prefs.labeler}"


def gold_reference(records: list[dict]) -> tuple[PairLabels, str]:
    """What the gold reward says of each (chosen, rejected) row: from the stored gold scores when every row has
    them (so label noise in the generated pairs is seen through), else the stored label itself."""
    scores = [(r.get("chosen_score"), r.get("rejected_score")) for r in records]
    if records and all(isinstance(c, (int, float)) and isinstance(s, (int, float)) for c, s in scores):
        first, second = (torch.tensor(col, dtype=torch.float64) for col in zip(*scores))
        return labels_from_scores(first, second), "gold scores"
    n = len(records)
    return PairLabels(torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), 0, 0), "stored labels"


def gold_gaps(records: list[dict]) -> np.ndarray:
    """|gold(chosen) − gold(rejected)| per row (NaN without scores)."""
    def gap(r: dict) -> float:
        c, s = r.get("chosen_score"), r.get("rejected_score")
        ok = isinstance(c, (int, float)) and isinstance(s, (int, float))
        return abs(float(c) - float(s)) if ok else math.nan
    return np.array([gap(r) for r in records], dtype=np.float64)


def agreement_summary(agree: np.ndarray, prompts: list[str], seed: int = 0) -> dict:
    """Share of `agree` (bool per pair) with a 95% bootstrap interval over prompts."""
    agree = np.asarray(agree, dtype=bool)
    n = int(agree.size)
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "pairs": 0, "prompts": 0}
    groups = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    index = np.array([groups[p] for p in prompts])
    hits = np.bincount(index, weights=agree.astype(float), minlength=len(groups))
    sizes = np.bincount(index, minlength=len(groups)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(groups), np.full(len(groups), 1.0 / len(groups)), size=BOOTSTRAP_SAMPLES)
    rates = (draws @ hits) / np.maximum(draws @ sizes, 1.0)
    low, high = np.quantile(rates, [0.025, 0.975])
    return {"rate": float(agree.mean()), "ci_low": float(low), "ci_high": float(high), "pairs": n,
            "prompts": len(groups), "ci": "95% bootstrap over prompts"}


def gold_agreement(records: list[dict], first_wins: torch.Tensor, decided: torch.Tensor, seed: int = 0) -> dict:
    """How often a labeller's verdicts (`first_wins` where `decided`, first = the row's stored chosen) match the
    gold reward: on every pair both decide, and on the clear-cut ones (gold gap > CLEAR_CUT_GOLD_GAP)."""
    reference, source = gold_reference(records)
    both = (decided & reference.decided).numpy()
    agree = (first_wins == reference.first_wins).numpy()
    prompts = [r["prompt"] for r in records]
    clear = both & (gold_gaps(records) > CLEAR_CUT_GOLD_GAP)
    return {"reference": source, "all": agreement_summary(*_subset(agree, prompts, both), seed),
            "clear_cut": {**agreement_summary(*_subset(agree, prompts, clear), seed),
                          "gold_gap_above": CLEAR_CUT_GOLD_GAP}}


def _subset(values: np.ndarray, prompts: list[str], mask: np.ndarray) -> tuple[np.ndarray, list[str]]:
    return values[mask], [p for p, m in zip(prompts, mask) if m]


def relabel_records(records: list[dict], labels: PairLabels, seed: int = 0) -> tuple[list[dict], dict]:
    """The rows as the labeller decided them (`labels`: first = the stored chosen): swapped where it prefers the
    stored rejected, dropped where it is undecided. Gold scores move with their completions, so
    `chosen_score` stays the gold score of the row's chosen text. Returns (rows, counts and gold agreement)."""
    out, flipped = [], 0
    for row, wins, decided in zip(records, labels.first_wins.tolist(), labels.decided.tolist()):
        if not decided:
            continue
        if not wins:
            flipped += 1
            row = swapped(row)
        out.append(row)
    info = {"pairs_in": len(records), "pairs_out": len(out), "flipped": flipped, "ties": labels.ties,
            "invalid": labels.invalid, "undecided_dropped": len(records) - len(out),
            "agreement_with_gold": gold_agreement(records, labels.first_wins, labels.decided, seed)}
    return out, info


def swapped(row: dict) -> dict:
    out = {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
    if "chosen_score" in row or "rejected_score" in row:
        out["chosen_score"], out["rejected_score"] = row.get("rejected_score"), row.get("chosen_score")
    return out


def filter_records(records: list[dict], margin: torch.Tensor, threshold: float,
                   seed: int = 0) -> tuple[list[dict], dict]:
    """Keep the rows whose reward-model margin r(chosen) − r(rejected) exceeds `threshold` (a non-finite margin
    is dropped). The gold agreement of the kept and the dropped rows says what the filter removed."""
    margin = margin.double()
    finite = torch.isfinite(margin)
    keep = finite & (margin > threshold)
    kept = [r for r, k in zip(records, keep.tolist()) if k]
    dropped = [r for r, k in zip(records, keep.tolist()) if not k]
    stored_label = torch.ones(len(records), dtype=torch.bool)   # the row's chosen, as labelled upstream

    def gold_of(rows: list[dict]) -> dict:
        n = torch.ones(len(rows), dtype=torch.bool)
        return gold_agreement(rows, n, n, seed)["all"]

    return kept, {
        "filter": "reward_model", "margin": threshold, "pairs_in": len(records), "pairs_out": len(kept),
        "dropped": len(dropped), "dropped_nonfinite": int((~finite).sum()),
        "reward_model_margin_mean": float(margin[finite].mean()) if bool(finite.any()) else None,
        "agreement_with_gold_in": gold_agreement(records, stored_label, stored_label, seed)["all"],
        "agreement_with_gold_kept": gold_of(kept), "agreement_with_gold_dropped": gold_of(dropped),
    }
