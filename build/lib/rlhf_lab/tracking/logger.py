"""Metrics go to a local JSONL file (always) and to W&B (unless logger=none); rank 0 only.

W&B runs offline by default, so compute nodes without network work; `wandb sync <run_dir>/wandb/offline-run-*`
uploads later. API keys are never passed through here: W&B reads its own key from the environment.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rlhf_lab.config import LoggerConfig


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_config: dict, *, name: str, group: str,
                 tags: list[str], is_main: bool = True):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb_run = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if cfg.name == "wandb" and cfg.mode != "disabled":
            self._wandb_run = self._init_wandb(Path(run_dir), cfg, run_config, name, group, tags)

    @staticmethod
    def _init_wandb(run_dir: Path, cfg: LoggerConfig, run_config: dict, name: str, group: str, tags: list[str]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group or group, name=name,
            tags=list(cfg.tags) + tags, config=run_config, dir=str(run_dir), reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)

    def close(self) -> None:
        if not self.is_main:
            return
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
