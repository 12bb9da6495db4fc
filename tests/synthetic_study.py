"""A synthetic study directory (points.csv with several methods × settings × seeds, study.json, run summaries,
optionally judge columns and judgements.csv) for the report, browser and notebook tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_lab.eval.points import POINT_COLUMNS

# (method, loss_type, knob, value): KL grows faster for small β / small KL coefficient
ARMS = [("dpo", "sigmoid", "beta", 0.1), ("dpo", "sigmoid", "beta", 0.5), ("dpo", "ipo", "beta", 0.5),
        ("ppo", "ppo", "kl_coef", 0.05), ("ppo", "ppo", "kl_coef", 0.2), ("ppo_gt", "ppo", "kl_coef", 0.05)]
SFT_GOLD = 0.48


def synthetic_points(seeds=(0, 1, 2), steps=(0, 10, 20, 30), study: str = "synthetic") -> pd.DataFrame:
    rng = np.random.default_rng(1234)
    rows = []
    for method, loss, knob, value in ARMS:
        run_base = f"{method if loss != 'ipo' else 'ipo'}-{knob}{value:g}"
        for seed in seeds:
            for step in steps:
                kl = 0.0 if step == 0 else step / 10 * (0.3 / value) * (1 + 0.1 * rng.standard_normal())
                gold = SFT_GOLD + 0.12 * np.log1p(abs(kl)) + (0 if step == 0 else 0.01 * rng.standard_normal())
                proxy = 2 * gold + 0.05 * kl if method == "ppo" else (gold if method == "ppo_gt" else np.nan)
                rows.append({
                    "study": study, "run_id": f"{run_base}-seed{seed}", "method": method, "loss_type": loss,
                    "beta": value if knob == "beta" else np.nan, "kl_coef": value if knob == "kl_coef" else np.nan,
                    "target_kl": np.nan, "seed": seed, "step": step, "samples": 64, "kl_mean": abs(kl),
                    "kl_se": 0.02 * abs(kl), "gold_reward_mean": gold, "gold_reward_se": 0.015,
                    "proxy_reward_mean": proxy, "response_len_mean": 40 + 2 * abs(kl), "temperature": 1.0,
                    "kl_sampled_mean": abs(kl), "kl_sampled_se": 0.05, "eos_fraction": 0.1,
                })
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def add_judge_columns(points: pd.DataFrame, judge: str = "oracle") -> pd.DataFrame:
    """Judge win rates on each run's final row only, as the judge stage writes them."""
    points = points.copy()
    final = points.groupby("run_id")["step"].transform("max") == points["step"]
    rate = (0.5 + points["gold_reward_mean"] - SFT_GOLD).clip(0, 1)
    points[f"judge_{judge}_win_rate"] = rate.where(final)
    points[f"judge_{judge}_ci_low"] = (rate - 0.05).where(final)
    points[f"judge_{judge}_ci_high"] = (rate + 0.05).where(final)
    return points


def write_synthetic_study(study_dir: Path, seeds=(0, 1, 2), judged: bool = False, meta: bool = True) -> Path:
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    points = synthetic_points(seeds)
    if judged:
        points = add_judge_columns(points)
        pd.DataFrame([{"run_id": r, "judge": "oracle", "n": 64, "win_rate": 0.6, "win_rate_ci_low": 0.5,
                       "win_rate_ci_high": 0.7, "lc_win_rate": 0.58, "position_bias_rate": 0.1,
                       "agreement_with_oracle": 1.0} for r in sorted(points["run_id"].unique())]
                     ).to_csv(study_dir / "judgements.csv", index=False)
    points.to_csv(study_dir / "points.csv", index=False)
    for run_id in points["run_id"].unique():
        (study_dir / "runs" / run_id).mkdir(parents=True, exist_ok=True)
        (study_dir / "runs" / run_id / "summary.json").write_text(json.dumps({"run_id": run_id, "seconds": 12.5}))
    if meta:
        (study_dir / "study.json").write_text(json.dumps({
            "study": "synthetic",
            "spec": {"name": "synthetic", "seeds": list(seeds), "arms": {"dpo": {"sweep": {"algo.beta": [0.1, 0.5]}}}},
            "stage_seconds": {"sft": 30.0, "preferences": 20.0, "reward_model": 40.0}, "run_seconds": {},
            "wall_seconds": 400.0, "versions": {"torch": "2.13.0", "rlhf_lab": "0.1.0"},
            "git": {"sha": "0123456789abcdef", "dirty": False}, "started": "2026-11-22T10:00:00",
            "finished": "2026-11-22T10:06:40"}))
    return study_dir
