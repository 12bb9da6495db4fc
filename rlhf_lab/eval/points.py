"""The points table: the contract between runs, the study, reports, W&B and notebooks.

One row per (run, evaluation step). Every method writes the same columns; KL is always the sequence-level
KL(π‖π_ref) on the policy's own samples at the evaluation temperature, in nats.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf_lab.eval.policy_eval import EvalResult
from rlhf_lab.trainers.compute import COST_COLUMNS

POINT_COLUMNS = [
    "study", "run_id", "method", "loss_type", "beta", "kl_coef", "target_kl", "lora_r", "seed", "step", "samples",
    "kl_mean", "kl_se", "gold_reward_mean", "gold_reward_se", "proxy_reward_mean", "response_len_mean",
    "temperature",
    # beyond the contract's minimum: the noisier sampled-KL estimate and EOS rate, for diagnostics
    "kl_sampled_mean", "kl_sampled_se", "eos_fraction",
    # what the run had spent when this row was evaluated (trainers/compute.py): the cost axis of the frontier;
    # wall seconds and peak memory depend on the machine, the other columns only on the configuration
    *COST_COLUMNS,
]
# columns that depend on the machine and its load, not on the configuration: left out when runs are compared
MACHINE_COLUMNS = ("train_seconds", "peak_rss_mib")


@dataclass
class RunIdentity:
    study: str
    run_id: str
    method: str                          # dpo | ppo | ppo_gt | sft ...
    loss_type: str
    seed: int
    beta: Optional[float] = None
    kl_coef: Optional[float] = None
    target_kl: Optional[float] = None
    lora_r: Optional[int] = None         # LoRA rank when only adapters were trained (a curve of its own)


def point_row(identity: RunIdentity, step: int, result: EvalResult, proxy_reward: Optional[float] = None,
              cost: Optional[dict] = None) -> dict:
    """One row; `cost` is ComputeMeter.totals() at this step (None: no training cost recorded)."""
    row = {
        "study": identity.study, "run_id": identity.run_id, "method": identity.method,
        "loss_type": identity.loss_type, "beta": identity.beta, "kl_coef": identity.kl_coef,
        "target_kl": identity.target_kl, "lora_r": identity.lora_r, "seed": identity.seed, "step": step,
        "samples": result.samples,
        "kl_mean": result.kl_mean, "kl_se": result.kl_se, "gold_reward_mean": result.gold_reward_mean,
        "gold_reward_se": result.gold_reward_se, "proxy_reward_mean": proxy_reward,
        "response_len_mean": result.response_len_mean, "temperature": result.temperature,
        "kl_sampled_mean": result.kl_sampled_mean, "kl_sampled_se": result.kl_sampled_se,
        "eos_fraction": result.eos_fraction,
        **{column: (cost or {}).get(column) for column in COST_COLUMNS},
    }
    return {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}


class PointsWriter:
    """Appends rows to `<run_dir>/points.csv` (header written once); each row is flushed as it is written. The
    file appears with the first row: a run that fails before evaluating anything leaves no points table."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def write(self, row: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="", buffering=1)
            self._writer = csv.DictWriter(self._file, fieldnames=POINT_COLUMNS)
            if new:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
