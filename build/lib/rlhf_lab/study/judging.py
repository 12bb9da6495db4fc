"""Judges in a study: the study file's `judges` block → win rates vs SFT per run → judge columns in the points table.

    judges:
      presets: [oracle, smollm2]   # conf/judge/<name>.yaml; each becomes judge_<name>_win_rate/_ci_low/_ci_high
      max_pairs: 12                # the first N held-out prompts of each run (null = every evaluation sample)
      seeds: [0]                   # judge only these seeds' runs (null = all): LLM judges are the slow part

Each run's final-step samples are compared with its own step-0 samples (the SFT model on the same prompts at the
same temperature). Verdicts are cached in `<cache_dir>/judge_verdicts.sqlite`, so a rerun makes no new calls.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from rlhf_lab.config import RunConfig
from rlhf_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)
JUDGE_KEYS = ("presets", "max_pairs", "seeds", "n_boot")


def validate_judges_spec(spec) -> list:
    """The study's `judges` block, checked when the study starts (not after every run has trained): its keys,
    each preset (which also validates its fields) and, for API judges, that their key is in the environment.
    Returns the judge configs."""
    from rlhf_lab.judges.config import OpenAIJudgeConfig, load_judge_preset
    from rlhf_lab.judges.openai_judge import resolve_api_key

    if not isinstance(spec, dict) or not spec.get("presets") or not isinstance(spec["presets"], list):
        raise ConfigError(f"study key 'judges': expected a mapping with a non-empty 'presets' list, got {spec!r}")
    unknown = set(spec) - set(JUDGE_KEYS)
    if unknown:
        raise ConfigError(f"study key 'judges': unknown key(s) {sorted(unknown)} (expected {', '.join(JUDGE_KEYS)})")
    for key in ("max_pairs", "n_boot"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"study key 'judges.{key}': expected an integer >= 1, got {value!r}")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds)):
        raise ConfigError(f"study key 'judges.seeds': expected a list of integers, got {seeds!r}")
    judges = [load_judge_preset(name) for name in spec["presets"]]
    for judge in judges:
        if isinstance(judge, OpenAIJudgeConfig) and judge.api_key_required:
            resolve_api_key(judge)   # raises ConfigError naming the variable; the key itself is never kept
    return judges


def judge_study_points(study_dir: Path, spec: dict, cfg: RunConfig, points: pd.DataFrame) -> pd.DataFrame:
    """Judge the study's runs (writes judgements.csv); return the points with the judge columns merged in."""
    from rlhf_lab.judges.study import judge_study, merge_judgements

    judges = validate_judges_spec(spec)
    seeds = spec.get("seeds")
    run_ids = None if seeds is None else set(points.loc[points["seed"].isin(seeds), "run_id"])
    table = judge_study(study_dir, judges, Path(cfg.cache_dir) / "judge_verdicts.sqlite",
                        n_boot=int(spec.get("n_boot", 2000)), max_pairs=spec.get("max_pairs"), run_ids=run_ids)
    merged = merge_judgements(points, table)
    log.info("judged %d runs with %s", table["run_id"].nunique() if len(table) else 0, ", ".join(spec["presets"]))
    return merged
