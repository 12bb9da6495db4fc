"""The study-level W&B run: the points table, the reward–KL frontier chart and the figures, in the study's group.

Each training run already logs into the group `<study>` (tracking/logger.py) with tags for method, loss type,
β / KL coefficient, seed and git SHA; this adds one `job_type=study` run beside them that holds what compares
them. Offline by default (`wandb sync <study_dir>/wandb/offline-run-*` uploads it later); with `logger=none`
nothing goes to W&B, and everything it would have held is on disk anyway (points.csv/parquet, frontier.csv,
figures/, report.html).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from rlhf_lab.config import LoggerConfig


def log_study(study_dir: Path, points: pd.DataFrame, cfg: LoggerConfig, study: str,
              frontier: pd.DataFrame | None = None, figures: dict[str, Path] | None = None) -> str | None:
    """Log the study's tables and charts; returns the W&B run directory (None when W&B is off).

    `frontier`: one row per frontier point with columns method, kl_mean, gold_reward_mean (sorted by KL)."""
    if cfg.name != "wandb" or cfg.mode == "disabled" or points.empty:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group or study,
                     name=f"{study}-study", job_type="study", tags=[*cfg.tags, "study"], dir=str(study_dir),
                     config={"study": study}, reinit="finish_previous")
    try:
        # missing values as None (W&B's optional), not "": a column must keep one type (judge columns are empty
        # on every row but the final step's)
        logged = {"points": wandb.Table(dataframe=points.astype(object).where(points.notna(), None))}
        final = points.loc[points["step"] > 0]
        if not final.empty:
            table = wandb.Table(dataframe=final[["method", "run_id", "kl_mean", "gold_reward_mean"]])
            logged["gold_vs_kl"] = wandb.plot.scatter(table, "kl_mean", "gold_reward_mean",
                                                      title="gold reward vs KL(π‖π_ref), every evaluation")
        if frontier is not None and not frontier.empty:
            methods = sorted(frontier["method"].unique())
            curves = [frontier[frontier["method"] == m].sort_values("kl_mean") for m in methods]
            logged["frontier"] = wandb.plot.line_series(
                xs=[c["kl_mean"].tolist() for c in curves], ys=[c["gold_reward_mean"].tolist() for c in curves],
                keys=methods, title="reward–KL frontier (max gold reward at each KL budget)", xname="KL (nats)")
            logged["frontier_table"] = wandb.Table(dataframe=frontier)
        for name, path in (figures or {}).items():
            if Path(path).suffix == ".png" and Path(path).exists():
                logged[f"figures/{name}"] = wandb.Image(str(path))
        run.log(logged)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
