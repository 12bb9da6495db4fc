"""A study: shared stages once, then every arm's sweep points (× seeds), then one points table.

The study file (`conf/studies/<name>.yaml`) names the arms; each arm is a list of Hydra overrides plus a sweep
(key → values); the runner composes each point's config with Hydra's compose API — the same configs a user gets
from `rlhf-lab ...` — and runs them in order. Stages are cached, finished runs are skipped, and a failed point is
recorded and does not stop the others.
"""
from __future__ import annotations

import itertools
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from rlhf_lab.cli import CONF_DIR
from rlhf_lab.config import validate_run_config
from rlhf_lab.eval.points import POINT_COLUMNS
from rlhf_lab.trainers.errors import PreemptedError
from rlhf_lab.utils.cache import atomic_write_text
from rlhf_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SweepPoint:
    arm: str
    run_id: str
    overrides: list[str]


def load_study(name: str) -> dict:
    path = Path(name) if name.endswith(".yaml") else Path(CONF_DIR) / "studies" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (Path(CONF_DIR) / "studies").glob("*.yaml"))
        raise ConfigError(f"study {name!r} not found at {path}; available studies: {', '.join(available)}")
    spec = yaml.safe_load(path.read_text())
    for key in ("name", "arms"):
        if key not in spec:
            raise ConfigError(f"study file {path}: missing key '{key}'")
    return spec


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def sweep_points(spec: dict, extra: list[str]) -> list[SweepPoint]:
    """Expand every arm's sweep (cartesian product of its keys) × the study's seeds into run overrides."""
    points = []
    for arm, arm_spec in spec["arms"].items():
        sweep = arm_spec.get("sweep", {}) or {}
        keys = list(sweep)
        for values in itertools.product(*(sweep[k] for k in keys)):
            for seed in spec.get("seeds", [0]):
                label = "-".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in zip(keys, values))
                run_id = f"{arm}-{label}-seed{seed}" if label else f"{arm}-seed{seed}"
                overrides = (list(spec.get("overrides", [])) + list(arm_spec.get("overrides", []))
                             + [f"{k}={v}" for k, v in zip(keys, values)]
                             + [f"seed={seed}", f"study={spec['name']}", f"run_id={run_id}"] + list(extra))
                points.append(SweepPoint(arm, run_id, overrides))
    return points


def compose_run_config(overrides: list[str]):
    """The same composition `rlhf-lab <overrides>` performs, then validation; errors name the override."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return validate_run_config(compose("config", overrides=overrides))
    except HydraException as e:
        raise ConfigError(f"{e} (overrides: {' '.join(overrides)})") from None


def aggregate_points(study_dir: Path) -> pd.DataFrame:
    """Concatenate every run's points.csv into `<study_dir>/points.csv` (written atomically)."""
    frames = [pd.read_csv(p) for p in sorted((study_dir / "runs").glob("*/points.csv")) if p.stat().st_size > 0]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POINT_COLUMNS)
    atomic_write_text(study_dir / "points.csv", table.to_csv(index=False))
    return table


def summary_table(points: pd.DataFrame) -> str:
    """Step 0 (SFT) and final evaluation of every run: gold reward and KL with standard errors."""
    if points.empty:
        return "(no points)"
    rows = []
    for run_id, g in points.groupby("run_id", sort=False):
        first, last = g.loc[g["step"].idxmin()], g.loc[g["step"].idxmax()]
        rows.append(f"{run_id:<28} step {int(last['step']):>4}  gold {last['gold_reward_mean']:.3f} ± "
                    f"{last['gold_reward_se']:.3f} (SFT {first['gold_reward_mean']:.3f})  "
                    f"KL {last['kl_mean']:.2f} ± {last['kl_se']:.2f}")
    return "\n".join(rows)


def study_main(args: list[str]) -> int:
    from rlhf_lab.study.pipeline import run_alignment

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    name = next((a.split("=", 1)[1] for a in args if a.startswith("study=")), "imdb")
    extra = [a for a in args if not a.startswith("study=")]
    spec = load_study(name)
    points = sweep_points(spec, extra)
    configs = [(p, compose_run_config(p.overrides)) for p in points]
    study_dir = Path(configs[0][1].output_root) / spec["name"]
    started, failures, timings = time.time(), [], {}
    for point, cfg in configs:
        run_dir = study_dir / "runs" / point.run_id
        log.info("=== %s", point.run_id)
        try:
            summary = run_alignment(cfg, run_dir)
            timings[point.run_id] = summary.get("seconds")
        except PreemptedError:  # the job was asked to stop: the run checkpointed; stop the study too
            raise
        except Exception as e:  # one failed point must not stop the others; the error is kept with the run
            failures.append(point.run_id)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "error.txt", traceback.format_exc())
            log.error("run %s failed: %s (details in %s)", point.run_id, e, run_dir / "error.txt")
    table = aggregate_points(study_dir)
    print(summary_table(table))
    print(f"\nstudy '{spec['name']}': {len(configs) - len(failures)}/{len(configs)} runs complete in "
          f"{time.time() - started:.0f} s")
    print(f"points table: {study_dir / 'points.csv'}")
    print(f"runs:         {study_dir / 'runs'}")
    if failures:
        print(f"FAILED runs: {', '.join(failures)}")
    return 1 if failures else 0
