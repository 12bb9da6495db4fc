"""The study's last phase: every finished run's points → one table → judges → frontier, figures, report, W&B.

It reads only what runs left on disk, so it works the same after a local study, after a SLURM array (as the
aggregate job) and on a partial study (it reports what is there; `rlhf-lab status` says what is missing).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from rlhf_lab.config import RunConfig
from rlhf_lab.eval.points import POINT_COLUMNS
from rlhf_lab.study import record
from rlhf_lab.utils.cache import atomic_write_text, is_complete

log = logging.getLogger(__name__)


def aggregate_points(study_dir: Path) -> pd.DataFrame:
    """Every complete run's points.csv, concatenated (in memory; `write_points` publishes it).

    Incomplete runs are left out (a killed run's rows may stop mid-way); the count is logged."""
    run_dirs = sorted(p for p in (study_dir / "runs").glob("*") if p.is_dir())
    complete = [d for d in run_dirs if is_complete(d) and (d / "points.csv").exists()]
    if len(complete) < len(run_dirs):
        log.info("aggregating %d complete runs (%d incomplete or failed left out)", len(complete),
                 len(run_dirs) - len(complete))
    frames = [pd.read_csv(d / "points.csv") for d in complete]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POINT_COLUMNS)


def write_points(study_dir: Path, table: pd.DataFrame) -> None:
    """`points.csv` and `points.parquet`, each written atomically."""
    atomic_write_text(study_dir / "points.csv", table.to_csv(index=False))
    tmp = study_dir / ".points.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(study_dir / "points.parquet")


def summary_table(points: pd.DataFrame) -> str:
    """Step 0 (SFT) and final evaluation of every run: gold reward and KL with standard errors."""
    if points.empty:
        return "(no points)"
    rows = []
    for run_id, g in points.groupby("run_id", sort=False):
        first, last = g.loc[g["step"].idxmin()], g.loc[g["step"].idxmax()]
        flops = pd.to_numeric(pd.Series([last.get("train_flops")]), errors="coerce").iloc[0]
        rows.append(f"{run_id:<30} step {int(last['step']):>4}  gold {last['gold_reward_mean']:.3f} ± "
                    f"{last['gold_reward_se']:.3f} (SFT {first['gold_reward_mean']:.3f})  "
                    f"KL {last['kl_mean']:.2f} ± {last['kl_se']:.2f}"
                    + (f"  {flops:.2g} FLOPs" if pd.notna(flops) else ""))
    return "\n".join(rows)


def overoptimisation_text(points: pd.DataFrame) -> str:
    """One line per Gao et al. 2023 fit (eval/overoptimisation.py), empty when no arm optimises a learned reward."""
    from rlhf_lab.eval.overoptimisation import describe_peak, overoptimisation_fits

    fits = overoptimisation_fits(points) if not points.empty else pd.DataFrame()
    return "".join(
        f"over-optimisation (Gao et al. 2023, gold gain = d(α − β·{'log d' if r.form == 'rl' else 'd'}), "
        f"d = √KL), {r.method}: α {r.alpha:.4f}, β {r.beta:.4f}, R² {r.r2:.3f} over {r.points} points; fitted "
        f"peak {describe_peak(r)}\n" for r in fits.itertuples())


def write_frontier(study_dir: Path, points: pd.DataFrame) -> pd.DataFrame:
    """`<study_dir>/frontier.csv`: each method's Pareto-frontier points (seed means with 95% CIs);
    `results.csv`: each setting's final evaluation (seed means with 95% CIs, and its cost); and
    `comparisons.csv`: every pair of methods at each KL budget, paired over seeds (eval/paired.py)."""
    from rlhf_lab.eval.frontier import aggregate_seeds, default_kl_budgets, final_points, pareto_frontier
    from rlhf_lab.eval.paired import PAIRED_COLUMNS, paired_comparisons

    frontier = pareto_frontier(aggregate_seeds(points)) if not points.empty else pd.DataFrame()
    atomic_write_text(study_dir / "frontier.csv", frontier.to_csv(index=False))
    atomic_write_text(study_dir / "results.csv", (final_points(points) if not points.empty
                                                  else pd.DataFrame()).to_csv(index=False))
    comparisons = (paired_comparisons(points, default_kl_budgets(points)) if not points.empty
                   else pd.DataFrame(columns=PAIRED_COLUMNS))
    atomic_write_text(study_dir / "comparisons.csv", comparisons.to_csv(index=False))
    return frontier


def finish_study(study_dir: Path, spec: dict, cfg: RunConfig, started: float | None) -> pd.DataFrame:
    """Aggregate, judge (if the study names judges), draw, report and log the study; print the short tables."""
    from rlhf_lab.study.report import frontier_summary_text, write_report
    from rlhf_lab.tracking.study_wandb import log_study

    phase_started = time.time()
    points = aggregate_points(study_dir)
    if spec.get("judges") and not points.empty:
        from rlhf_lab.study.judging import judge_study_points

        points = judge_study_points(study_dir, spec["judges"], cfg, points)  # + judge_<name>_* columns
    write_points(study_dir, points)
    frontier = write_frontier(study_dir, points)
    if started is not None:  # a whole local study; an aggregate job alone does not know the study's start
        record.record_study(study_dir, wall_seconds=round(time.time() - started, 1))
    record.record_study(study_dir, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    report = write_report(study_dir)
    figures = {p.stem: p for p in sorted((study_dir / "figures").glob("*.png"))}
    wandb_dir = log_study(study_dir, points, cfg.logger, spec["name"],
                          frontier.rename(columns={"method_label": "method", "gold_mean": "gold_reward_mean"}),
                          figures)
    record.record_study(study_dir, phase_seconds={"aggregate": round(time.time() - phase_started, 1)})
    print(summary_table(points))
    print("\nbest gold reward per method within each KL budget (nats):")
    print(frontier_summary_text(points))
    print(overoptimisation_text(points), end="")
    print(f"\npoints table: {study_dir / 'points.csv'} ({points['run_id'].nunique() if len(points) else 0} runs)")
    print(f"frontier:     {study_dir / 'frontier.csv'}, figures in {study_dir / 'figures'}")
    print(f"report:       {report}")
    if wandb_dir:
        print(f"W&B (offline): wandb sync {wandb_dir}")
    return points
