"""Judge a finished study: every run's final-step samples against its step-0 (SFT) samples, by every judge.

Inputs are the per-run samples files the trainers write (eval/samples.py); pairs are matched by evaluation row
(the same held-out prompt). Outputs, both written atomically:
  <study_dir>/judgements.csv      one row per run × judge (JUDGEMENT_COLUMNS)
  <study_dir>/judge_agreement.csv one row per run × pair of judges: how often they agree
`merge_judgements` puts judge_<name>_win_rate / _ci_low / _ci_high on the final-step rows of a points table.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_lab.eval.samples import read_samples, sample_steps, samples_path
from rlhf_lab.judges.base import Judge
from rlhf_lab.judges.cache import VerdictCache
from rlhf_lab.judges.config import JudgeConfig, parse_judge_configs
from rlhf_lab.judges.evaluate import build_judge, judge_pairs, win_rate_metrics
from rlhf_lab.judges.oracle import RecordScorer
from rlhf_lab.judges.winrate import agreement
from rlhf_lab.utils.cache import atomic_write_text
from rlhf_lab.utils.errors import DataError
from rlhf_lab.utils.progress import Progress

log = logging.getLogger(__name__)

JUDGEMENT_COLUMNS = [
    "run_id", "judge", "temperature", "n", "wins", "losses", "ties", "invalid", "win_rate", "win_rate_ci_low",
    "win_rate_ci_high", "lc_win_rate", "position_bias_rate", "agreement_with_oracle", "requests", "tokens",
    "cost_usd",
    # beyond the contract: what was compared and how much came from the cache
    "step", "baseline_step", "cached",
]


@dataclass
class RunPairs:
    """One run's matched pairs: policy (final step) vs baseline (step 0) on the same prompts."""

    run_id: str
    step: int                      # the policy's evaluation step
    baseline_step: int             # 0: the SFT model
    temperature: float
    prompts: list[str]             # (N,) held-out prompts
    policy: list[str]              # (N,) final-step completions
    baseline: list[str]            # (N,) step-0 completions
    policy_len: np.ndarray         # (N,) completion tokens
    baseline_len: np.ndarray
    oracle: np.ndarray             # (N,) gold-reward outcome for the policy: 1 / 0 / 0.5, NaN without gold
    records: list[dict]            # both steps' records (for the oracle judge's score lookup)


def load_run_pairs(run_dir: Path, max_pairs: int | None = None) -> RunPairs | None:
    """The run's pairs, or None when it has fewer than two sample steps (not evaluated, or an old run)."""
    steps = sample_steps(run_dir)
    if len(steps) < 2 or steps[0] != 0:
        return None
    final_path, base_path = samples_path(run_dir, steps[-1]), samples_path(run_dir, 0)
    final = {r["index"]: r for r in read_samples(final_path)}
    base = {r["index"]: r for r in read_samples(base_path)}
    rows = sorted(set(final) & set(base))[:max_pairs]
    if not rows:
        raise DataError(f"{final_path} and {base_path} share no sample index")
    for i in rows:
        if final[i]["prompt"] != base[i]["prompt"]:
            raise DataError(f"{final_path}: sample index {i} has a different prompt than in {base_path}")
    golds = [(final[i].get("gold"), base[i].get("gold")) for i in rows]
    oracle = np.array([math.nan if a is None or b is None else (0.5 if a == b else float(a > b)) for a, b in golds])
    return RunPairs(
        run_id=Path(run_dir).name, step=steps[-1], baseline_step=0,
        temperature=float(final[rows[0]].get("temperature", math.nan)),
        prompts=[final[i]["prompt"] for i in rows], policy=[final[i]["completion"] for i in rows],
        baseline=[base[i]["completion"] for i in rows],
        policy_len=np.array([final[i]["length"] for i in rows], np.float64),
        baseline_len=np.array([base[i]["length"] for i in rows], np.float64), oracle=oracle,
        records=[final[i] for i in rows] + [base[i] for i in rows])


def judge_study(study_dir: Path, judge_cfgs: list, cache_path: Path, *, n_boot: int = 2000, alpha: float = 0.05,
                seed: int = 0, max_pairs: int | None = None, run_ids: set[str] | None = None) -> pd.DataFrame:
    """Judge every run under `<study_dir>/runs/*/` with samples; write and return judgements.csv (see module doc).

    `judge_cfgs`: judge configs (dicts, DictConfigs or judges.config dataclasses); `cache_path`: the SQLite
    verdict cache (share one across studies: identical comparisons are never paid twice); `run_ids`: judge only
    these runs (None = all); `max_pairs`: the first N held-out prompts of each run."""
    study_dir = Path(study_dir)
    cfgs = parse_judge_configs(judge_cfgs)
    names = [c.name for c in cfgs]
    run_dirs = [d for d in sorted((study_dir / "runs").glob("*/")) if run_ids is None or d.name in run_ids]
    runs = [p for d in run_dirs if (p := load_run_pairs(d, max_pairs)) is not None]
    if not runs:
        log.warning("no run under %s has samples at step 0 and a later step; nothing to judge", study_dir / "runs")
    cache = VerdictCache(cache_path)
    rows, agreement_rows = [], []
    scorer = RecordScorer(r for run in runs for r in run.records if r.get("gold") is not None)
    try:
        outcomes: dict[tuple[str, str], np.ndarray] = {}
        with Progress("judging", len(cfgs) * len(runs), "run") as progress:
            for cfg in cfgs:
                judge = build_judge(cfg, scorer=scorer, scorer_id="recorded-gold")
                try:
                    for run in runs:
                        row, outcomes[(run.run_id, cfg.name)] = _judge_run(judge, cfg, run, cache, n_boot, alpha,
                                                                            seed)
                        rows.append(row)
                        progress.advance()
                finally:
                    judge.close()
        agreement_rows = _agreement_rows(runs, names, outcomes)
    finally:
        cache.close()
    table = pd.DataFrame(rows, columns=JUDGEMENT_COLUMNS)
    atomic_write_text(study_dir / "judgements.csv", table.to_csv(index=False))
    atomic_write_text(study_dir / "judge_agreement.csv",
                      pd.DataFrame(agreement_rows, columns=["run_id", "judge_x", "judge_y", "agreement", "n"])
                      .to_csv(index=False))
    _log_costs(table)
    return table


def _judge_run(judge: Judge, cfg: JudgeConfig, run: RunPairs, cache: VerdictCache, n_boot: int, alpha: float,
               seed: int) -> tuple[dict, np.ndarray]:
    judged = judge_pairs(judge, run.prompts, run.policy, run.baseline, cache, both_orders=cfg.both_orders)
    metrics = win_rate_metrics(judge, judged, run.policy_len, run.baseline_len, run.oracle, n_boot, alpha, seed)
    row = {"run_id": run.run_id, "judge": cfg.name, "temperature": run.temperature, **metrics, "step": run.step,
           "baseline_step": run.baseline_step}
    log.info("%s / %s: win rate %.3f [%.3f, %.3f] (n=%d, invalid %d), LC %.3f, position bias %.3f",
             run.run_id, cfg.name, row["win_rate"], row["win_rate_ci_low"], row["win_rate_ci_high"], row["n"],
             row["invalid"], row["lc_win_rate"], row["position_bias_rate"])
    return row, judged.outcomes


def _agreement_rows(runs: list[RunPairs], names: list[str], outcomes: dict) -> list[dict]:
    rows = []
    for run in runs:
        for x, y in itertools.combinations(names, 2):
            value, n = agreement(outcomes[(run.run_id, x)], outcomes[(run.run_id, y)])
            rows.append({"run_id": run.run_id, "judge_x": x, "judge_y": y, "agreement": value, "n": n})
    return rows


def _log_costs(table: pd.DataFrame) -> None:
    for name, group in table.groupby("judge", sort=False):
        log.info("judge %s: %d requests, %d tokens, estimated $%.4f this evaluation (%d verdicts from cache)",
                 name, group["requests"].sum(), group["tokens"].sum(), group["cost_usd"].sum(), group["cached"].sum())


def merge_judgements(points: pd.DataFrame, judgements: pd.DataFrame) -> pd.DataFrame:
    """`points` plus judge_<name>_win_rate / _ci_low / _ci_high on each run's judged (final-step) row; other rows
    get NaN. Rows are matched on run_id and step."""
    out = points.copy()
    for name, group in judgements.groupby("judge", sort=False):
        cols = group[["run_id", "step", "win_rate", "win_rate_ci_low", "win_rate_ci_high"]].rename(columns={
            "win_rate": f"judge_{name}_win_rate", "win_rate_ci_low": f"judge_{name}_ci_low",
            "win_rate_ci_high": f"judge_{name}_ci_high"})
        cols = cols.astype({"step": out["step"].dtype}) if "step" in out else cols
        out = out.merge(cols, on=["run_id", "step"], how="left")
    return out
