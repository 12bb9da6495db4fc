"""A study: shared stages once, then every arm's sweep points (× seeds), then one points table, frontier and report.

The study file (`experiments/<name>/study.yaml` or `conf/studies/<name>.yaml`) names the arms; each arm is a list
of Hydra overrides plus a sweep (key → values); the runner composes each point's config with Hydra's compose API —
the same configs a user gets from `rlhf-lab ...` — so a point runs identically here, in a SLURM array task or from
the command line. A study's `budget` gives every trained arm the same training budget (config.BudgetConfig).

    rlhf-lab study study=NAME [jobs=N] [overrides]   everything, locally (N sweep points in parallel)
    rlhf-lab study study=NAME phase=list             the sweep points, one run id per line (index = line number)
    rlhf-lab study study=NAME phase=stages           only the shared stages (SFT, preferences, RM, reference)
    rlhf-lab study study=NAME phase=point index=I    sweep point I (default: $SLURM_ARRAY_TASK_ID)
    rlhf-lab study study=NAME phase=aggregate        points table, frontier, report, W&B study run
    rlhf-lab study study=NAME launcher=slurm [sbatch="--partition=gpu ..."]
                                                     the three phases above as SLURM jobs (stages → array → aggregate)

Stages are cached, finished runs are skipped, and a failed point is recorded (error.txt) without stopping others.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from rlhf_lab.cli import CONF_DIR
from rlhf_lab.config import (BUDGET_UNITS, BestOfNConfig, PPOConfig, RunConfig, SamplingConfig, to_container,
                             validate_run_config)
from rlhf_lab.config_keys import check_keys_are_read, override_keys
from rlhf_lab.distributed import comm
from rlhf_lab.paths import study_file, study_names
from rlhf_lab.study import record
from rlhf_lab.study.points import PointLauncher, SweepPoint, run_points
from rlhf_lab.trainers.errors import PreemptedError
from rlhf_lab.utils.cache import atomic_write_text, stable_hash
from rlhf_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)
PHASES = ("all", "list", "stages", "point", "aggregate")
STUDY_OPTIONS = ("study", "phase", "index", "jobs", "launcher", "sbatch")
STUDY_KEYS = ("name", "description", "overrides", "seeds", "arms", "jobs", "judges", "resources", "budget")
RESOURCE_KEYS = {"processes": 1, "nodes": 1, "gpus_per_node": 0, "cpus_per_process": 1}


def study_resources(spec: dict, path: str = "study file") -> dict[str, int]:
    """`resources` of a study: processes per sweep point (data-parallel ranks, one per GPU on a GPU cluster),
    nodes per point, GPUs per node and CPU cores per process; every point of the study has this shape."""
    given = spec.get("resources") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: 'resources' must be a mapping of {', '.join(RESOURCE_KEYS)}")
    unknown = set(given) - set(RESOURCE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: resources has unknown key(s) {', '.join(sorted(unknown))} "
                          f"(expected {', '.join(RESOURCE_KEYS)})")
    res = {**RESOURCE_KEYS, **given}
    for key, value in res.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_node" else 1):
            raise ConfigError(f"{path}: resources.{key} must be a {'non-negative' if key == 'gpus_per_node' else 'positive'}"
                              f" integer, got {value!r}")
    if res["processes"] % res["nodes"]:
        raise ConfigError(f"{path}: resources.processes={res['processes']} is not a multiple of "
                          f"resources.nodes={res['nodes']}")
    return res


@dataclass
class StudyArgs:
    name: str = "frontier-imdb"
    phase: str = "all"
    index: int | None = None     # sweep point for phase=point
    jobs: int | None = None      # sweep points run at once on this machine (None = the study file's `jobs`, or 1)
    launcher: str = "local"      # local | slurm
    sbatch: str | None = None    # extra sbatch options for launcher=slurm, e.g. "--partition=gpu --time=2:00:00"
    overrides: tuple[str, ...] = ()


def parse_study_args(args: list[str]) -> StudyArgs:
    """Split `key=value` study options from the Hydra overrides applied to every run."""
    opts, overrides = {}, []
    for arg in args:
        key, _, value = arg.partition("=")
        (opts.__setitem__(key, value) if key in STUDY_OPTIONS else overrides.append(arg))
    parsed = StudyArgs(name=opts.get("study", "frontier-imdb"), phase=opts.get("phase", "all"),
                       launcher=opts.get("launcher", "local"), sbatch=opts.get("sbatch"),
                       overrides=tuple(overrides))
    if parsed.phase not in PHASES:
        raise ConfigError(f"phase={parsed.phase!r}: expected one of {', '.join(PHASES)}")
    if parsed.launcher not in ("local", "slurm"):
        raise ConfigError(f"launcher={parsed.launcher!r}: expected local or slurm")
    index = opts.get("index", os.environ.get("SLURM_ARRAY_TASK_ID") if parsed.phase == "point" else None)
    for key, value in (("index", index), ("jobs", opts.get("jobs"))):
        if value is not None and not str(value).isdigit():
            raise ConfigError(f"{key}={value!r}: expected a non-negative integer")
    parsed.index = None if index is None else int(index)
    parsed.jobs = max(1, int(opts["jobs"])) if "jobs" in opts else None
    if parsed.phase == "point" and parsed.index is None:
        raise ConfigError("phase=point needs index=I (or SLURM_ARRAY_TASK_ID in the environment)")
    return parsed


def load_study(name: str) -> dict:
    path = study_file(name)
    if not path.is_file():
        raise ConfigError(f"study {name!r} not found at {path}; available studies: {', '.join(study_names())}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"study file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    validate_study_spec(spec, f"study file {path}")
    return spec


def validate_study_spec(spec, where: str) -> None:
    """Every key of a study file, checked before anything runs: a typo or an empty sweep is an error naming
    it, never a silently smaller study."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(STUDY_KEYS)}, got {type(spec).__name__}")
    for key in ("name", "arms"):
        if key not in spec:
            raise ConfigError(f"{where}: missing key '{key}'")
    unknown = set(spec) - set(STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected {', '.join(STUDY_KEYS)})")
    if not isinstance(spec["name"], str) or not spec["name"].strip() or "/" in spec["name"]:
        raise ConfigError(f"{where}: 'name' must be a non-empty string without '/', got {spec['name']!r}")
    _check_list(spec.get("overrides", []), str, f"{where}: 'overrides'", "strings (Hydra overrides)")
    _check_list(spec.get("seeds", [0]), int, f"{where}: 'seeds'", "integers", non_empty=True)
    if len(set(spec.get("seeds", [0]))) != len(spec.get("seeds", [0])):
        raise ConfigError(f"{where}: 'seeds' has duplicates: {spec['seeds']}")
    jobs = spec.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"{where}: 'jobs' must be an integer >= 1, got {jobs!r}")
    arms = spec["arms"]
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{where}: 'arms' must be a non-empty mapping of arm name -> {{overrides, sweep}}")
    for arm, arm_spec in arms.items():
        _check_arm(arm, arm_spec or {}, where)
    study_resources(spec, where)
    budget_overrides(spec, where)
    run_ids = [p.run_id for p in sweep_points(spec, [])]
    duplicates = sorted({r for r in run_ids if run_ids.count(r) > 1})
    if duplicates:
        raise ConfigError(f"{where}: sweep values that print alike give duplicate run ids {duplicates}; "
                          "make the values distinct")


def budget_overrides(spec: dict, where: str = "study") -> list[str]:
    """A study's `budget: {by: samples | flops | seconds, value: V}` as the overrides that give every trained arm
    the same training budget (config.BudgetConfig: samples set the steps; flops and seconds stop training when
    spent, at most at the arm's train.steps)."""
    budget = spec.get("budget")
    if budget is None:
        return []
    if not isinstance(budget, dict) or set(budget) != {"by", "value"} or budget["by"] not in BUDGET_UNITS \
            or not isinstance(budget["value"], (int, float)) or isinstance(budget["value"], bool) \
            or not budget["value"] > 0:
        raise ConfigError(f"{where}: 'budget' must be {{by: {' | '.join(BUDGET_UNITS)}, value: a number > 0}}, "
                          f"got {budget!r}")
    return [f"train.budget.by={budget['by']}", f"train.budget.value={budget['value']}"]


def _trains(overrides: list[str]) -> bool:
    """Whether an arm trains (best-of-n samples from the SFT model: a training budget does not apply to it)."""
    return "algo=best_of_n" not in overrides


def _check_arm(arm, arm_spec, where: str) -> None:
    if not isinstance(arm, str) or not arm or "/" in arm:
        raise ConfigError(f"{where}: arm name {arm!r} must be a non-empty string without '/'")
    if not isinstance(arm_spec, dict):
        raise ConfigError(f"{where}: arm '{arm}' must be a mapping with keys overrides, sweep")
    for key in arm_spec:
        if key not in ("overrides", "sweep"):
            raise ConfigError(f"{where}: arm '{arm}' has unknown key '{key}' (expected overrides, sweep)")
    _check_list(arm_spec.get("overrides", []), str, f"{where}: arm '{arm}' overrides", "strings (Hydra overrides)")
    sweep = arm_spec.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise ConfigError(f"{where}: arm '{arm}' sweep must be a mapping of config key -> list of values")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: arm '{arm}' sweep key '{key}' must be a non-empty list of values, got "
                              f"{values!r} (an empty list would silently drop the arm)")


def _check_list(value, kind: type, where: str, what: str, non_empty: bool = False) -> None:
    ok = isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    if not ok or (non_empty and not value):
        raise ConfigError(f"{where} must be a {'non-empty ' if non_empty else ''}list of {what}, got {value!r}")


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def sweep_points(spec: dict, extra: list[str] | tuple[str, ...]) -> list[SweepPoint]:
    """Expand every arm's sweep (cartesian product of its keys) × the study's seeds into run overrides."""
    points = []
    for arm, arm_spec in spec["arms"].items():
        sweep = (arm_spec or {}).get("sweep", {}) or {}
        keys = list(sweep)
        for values in itertools.product(*(sweep[k] for k in keys)):
            for seed in spec.get("seeds", [0]):
                label = "-".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in zip(keys, values))
                run_id = f"{arm}-{label}-seed{seed}" if label else f"{arm}-seed{seed}"
                arm_overrides = list(spec.get("overrides", [])) + list((arm_spec or {}).get("overrides", []))
                overrides = (arm_overrides + (budget_overrides(spec) if _trains(arm_overrides) else [])
                             + [f"{k}={v}" for k, v in zip(keys, values)]
                             + [f"seed={seed}", f"study={spec['name']}", f"run_id={run_id}"] + list(extra))
                points.append(SweepPoint(arm, run_id, overrides, len(points)))
    return points


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The same composition `rlhf-lab <overrides>` performs, then validation; errors name the override."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return validate_run_config(compose("config", overrides=overrides))
    except HydraException as e:
        raise ConfigError(f"{e} (overrides: {' '.join(overrides)})") from None


def check_arm_keys_are_read(spec: dict, points, configs: list[RunConfig]) -> None:
    """An arm's own overrides and sweep keys must be read by that arm's runs (a `train.batch_size` sweep on a PPO
    arm would sweep nothing); the study-wide overrides serve every arm, so each arm may leave some unread."""
    for point, cfg in zip(points, configs):
        arm = spec["arms"][point.arm] or {}
        keys = override_keys(list(arm.get("overrides", []))) + list(arm.get("sweep") or {})
        check_keys_are_read(cfg, keys, f"study arm '{point.arm}': ")


def study_dir_of(cfg: RunConfig, spec: dict) -> Path:
    return Path(cfg.output_root) / spec["name"]


# ------------------------------------------------------------------------------------------------ stages phase
def stage_signature(cfg: RunConfig) -> str:
    """What decides which shared stages a run needs: two runs with equal signatures need the same stages."""
    from rlhf_lab.recipes.run import learns_reward_model

    resolved = to_container(cfg)
    a = cfg.algo
    needs = (f"ppo:{a.reward}:{a.critic_init}" if isinstance(a, PPOConfig) else
             f"best_of_n:{a.scorer}" if isinstance(a, BestOfNConfig) else
             f"on_policy:{learns_reward_model(a)}" if isinstance(a, SamplingConfig) else "dpo")
    keep = ("task", "reward", "model", "sft", "preferences", "reward_model", "data", "cache_dir", "optim")
    return stable_hash({"needs": needs, "precision": cfg.train.precision, **{k: resolved.get(k) for k in keep}})


def run_stages(configs: list[RunConfig], study_dir: Path) -> dict[str, str]:
    """Build every distinct set of shared stages the study's runs need, before any run starts.

    Returns {stage signature: error} for the sets that failed (e.g. a missing dataset): the points that need them
    fail, the others go on."""
    from rlhf_lab.recipes.run import build_run_stages

    started, seen, errors = time.time(), set(), {}
    for cfg in configs:
        signature = stage_signature(cfg)
        if signature in seen:
            continue
        seen.add(signature)
        try:
            record.record_stages(study_dir, build_run_stages(cfg))
        except PreemptedError:
            raise
        except Exception as e:  # noqa: BLE001 — kept with every point that needed these stages
            errors[signature] = traceback.format_exc()
            log.error("shared stages for %s failed: %s", cfg.run_id, e)
    record.record_study(study_dir, phase_seconds={"stages": round(time.time() - started, 1)})
    return errors


def fail_points_without_stages(points, configs, study_dir: Path, errors: dict[str, str]) -> list[int]:
    """Write the stage error into each point that needed the failed stages; return the indices still runnable."""
    runnable = []
    for i, (point, cfg) in enumerate(zip(points, configs)):
        error = errors.get(stage_signature(cfg))
        if error is None:
            runnable.append(i)
            continue
        run_dir = study_dir / "runs" / point.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "error.txt", f"a shared stage this run needs failed:\n{error}")
    return runnable


# ------------------------------------------------------------------------------------------------ entry point
def study_main(args: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    opts = parse_study_args(args)
    spec = load_study(opts.name)
    if spec.get("judges") is not None and opts.phase in ("all", "aggregate"):
        from rlhf_lab.study.judging import validate_judges_spec

        validate_judges_spec(spec["judges"])
    points = sweep_points(spec, opts.overrides)
    if not points:
        raise ConfigError(f"study {opts.name!r} has no sweep points (check its arms and seeds)")
    if opts.phase == "list":
        print("\n".join(p.run_id for p in points))
        return 0
    if opts.phase == "point":
        if opts.index >= len(points):
            raise ConfigError(f"index={opts.index}: study {spec['name']!r} has {len(points)} points (0..{len(points) - 1})")
        points = [points[opts.index]]
    configs = [compose_run_config(p.overrides) for p in points]
    check_arm_keys_are_read(spec, points, configs)
    study_dir = study_dir_of(configs[0], spec)
    if opts.launcher == "slurm":
        from rlhf_lab.study.slurm import submit_study

        import shlex

        jobs = submit_study(opts.name, list(opts.overrides), shlex.split(opts.sbatch) if opts.sbatch else None)
        print(" ".join(f"{phase}={job}" for phase, job in jobs.items()))
        print(f"follow it with: rlhf-lab status study={opts.name}")
        return 0
    return _run_phases(opts, spec, points, configs, study_dir)


def _run_phases(opts: StudyArgs, spec: dict, points, configs, study_dir: Path) -> int:
    from rlhf_lab.study.finish import finish_study
    from rlhf_lab.tracking.run_info import git_info, package_versions

    started = time.time()
    if comm.is_main():
        record.record_study(study_dir, study=spec["name"], spec=spec, versions=package_versions(), git=git_info(),
                            overrides=list(opts.overrides))
    launcher = PointLauncher(opts.name, tuple(opts.overrides), study_resources(spec)["processes"])
    if opts.phase == "point":
        launcher.run(points[0], study_dir, configs[0])
        return 0
    failures, runnable = [], list(range(len(points)))
    if opts.phase in ("all", "stages"):
        errors = run_stages(configs, study_dir)
        runnable = fail_points_without_stages(points, configs, study_dir, errors)
        failures = [p.run_id for i, p in enumerate(points) if i not in runnable]
    if opts.phase == "all":
        jobs = opts.jobs or int(spec.get("jobs", 1))
        failures += run_points([points[i] for i in runnable], [configs[i] for i in runnable], study_dir, jobs,
                               launcher)
    if opts.phase in ("all", "aggregate"):
        finish_study(study_dir, spec, configs[0], started if opts.phase == "all" else None)
    if failures:
        print(f"FAILED runs: {', '.join(failures)} (`rlhf-lab status study={opts.name}` shows their errors; "
              f"rerunning the study completes only what is missing)")
    return 1 if failures else 0
