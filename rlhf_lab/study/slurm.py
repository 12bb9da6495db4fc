"""Submit a study to SLURM as three dependent jobs of one template (`slurm/array.sbatch`):

    stages     the shared stages (SFT, preferences, reward model, reference log-probs), built once
    points     an array, task I = sweep point I        --dependency=afterok:<stages>
    aggregate  points table, frontier, report         --dependency=afterany:<points>

`afterok` keeps the array from starting on missing stages (and cancels it if the stages job fails:
--kill-on-invalid-dep); `afterany` lets the report show every point that finished even if some failed.

    rlhf-lab study study=frontier-imdb launcher=slurm [overrides]
    python -m rlhf_lab.study.slurm study=frontier-imdb [overrides] [-- sbatch options for all three jobs]

sbatch options for all three jobs: `sbatch_args`, else $RLHF_LAB_SBATCH_ARGS (e.g. "--partition=gpu --gres=gpu:1");
sbatch's own SBATCH_* variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...) work as usual.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf_lab.utils.errors import ConfigError

TEMPLATE_ENV = "RLHF_LAB_SBATCH_TEMPLATE"
ARGS_ENV = "RLHF_LAB_SBATCH_ARGS"


def template_path() -> Path:
    """slurm/array.sbatch of this checkout (an editable install), or $RLHF_LAB_SBATCH_TEMPLATE."""
    path = Path(os.environ.get(TEMPLATE_ENV) or Path(__file__).resolve().parents[2] / "slurm" / "array.sbatch")
    if not path.is_file():
        raise ConfigError(f"sbatch template not found at {path}: set {TEMPLATE_ENV} to slurm/array.sbatch of an "
                          f"rlhf_lab checkout")
    return path


def study_layout(study_name: str, extra_overrides: list[str]) -> tuple[str, int, Path, dict]:
    """(study name as written in its file, number of sweep points, study output directory, resources per point)
    — the same expansion `rlhf-lab study ... phase=list` prints, so array index I is line I of that list."""
    from rlhf_lab.study.runner import compose_run_config, load_study, study_resources, sweep_points

    spec = load_study(study_name)
    points = sweep_points(spec, extra_overrides)
    if not points:
        raise ConfigError(f"study {study_name!r} has no sweep points")
    output_root = Path(compose_run_config(points[0].overrides).output_root)
    return spec["name"], len(points), output_root / spec["name"], study_resources(spec)


def point_resources(resources: dict) -> list[str]:
    """sbatch options that give every array task (one sweep point) its processes: one srun task per rank,
    spread over `nodes` nodes, with GPUs per node when the study asks for them. The template starts the ranks
    with srun and points them at the first node (multi-node rendezvous from SLURM's variables)."""
    processes, nodes = resources["processes"], resources["nodes"]
    options = [f"--nodes={nodes}", f"--ntasks={processes}", f"--ntasks-per-node={processes // nodes}",
               f"--cpus-per-task={resources['cpus_per_process']}"]
    if resources["gpus_per_node"]:
        options.append(f"--gpus-per-node={resources['gpus_per_node']}")
    return options


def venv_dir() -> str | None:
    """The virtual environment this process runs in, for the jobs to activate (None outside one)."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def sbatch(args: list[str], env: dict[str, str]) -> str:
    """Run sbatch --parsable and return the job id."""
    if not shutil.which("sbatch"):
        raise ConfigError("sbatch not found: launcher=slurm must run on a SLURM login node")
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ConfigError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]   # "id" or "id;cluster"


def phase_env(study_name: str, phase: str) -> dict[str, str]:
    env = {**os.environ, "STUDY": study_name, "PHASE": phase}
    venv = venv_dir()
    if venv and "RLHF_LAB_VENV" not in os.environ:
        env["RLHF_LAB_VENV"] = venv
    return env


def submit_study(study_name: str, extra_overrides: list[str], sbatch_args: list[str] | None = None,
                 max_parallel: int | None = None) -> dict[str, str]:
    """Submit stages → points array → aggregate; returns {"stages": id, "points": id, "aggregate": id}.

    Jobs run in the current directory (relative output_root / cache_dir resolve as they do locally) and log
    to `<output_root>/<study>/slurm/`. `max_parallel` caps how many array tasks run at once (--array=...%N).
    """
    name, count, study_dir, resources = study_layout(study_name, list(extra_overrides))
    template = str(template_path())
    if sbatch_args is None:
        sbatch_args = shlex.split(os.environ.get(ARGS_ENV, ""))
    logs = study_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    common = [f"--chdir={Path.cwd()}", *sbatch_args]
    overrides = list(extra_overrides)

    def submit(phase: str, job_name: str, log_name: str, *args: str) -> str:
        return sbatch([f"--job-name={name}-{job_name}", f"--output={logs / log_name}", *args, *common,
                       template, *overrides], phase_env(study_name, phase))

    ids = {"stages": submit("stages", "stages", "stages-%j.out")}
    array = f"0-{count - 1}" + (f"%{max_parallel}" if max_parallel else "")
    shape = point_resources(resources) if resources["processes"] > 1 or resources["gpus_per_node"] else []
    ids["points"] = submit("point", "points", "point-%A_%a.out", f"--array={array}",
                           f"--dependency=afterok:{ids['stages']}", "--kill-on-invalid-dep=yes", *shape)
    ids["aggregate"] = submit("aggregate", "aggregate", "aggregate-%j.out",
                              f"--dependency=afterany:{ids['points']}")
    return ids


def main(argv: list[str]) -> int:
    """python -m rlhf_lab.study.slurm study=NAME [overrides] [-- sbatch options]"""
    split = argv.index("--") if "--" in argv else len(argv)
    args, sbatch_args = argv[:split], argv[split + 1:] or None
    study = next((a.split("=", 1)[1] for a in args if a.startswith("study=")), None)
    if study is None:
        print(main.__doc__, file=sys.stderr)
        return 2
    try:
        ids = submit_study(study, [a for a in args if not a.startswith("study=")], sbatch_args)
    except ConfigError as e:
        print(f"rlhf-lab: error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{phase}={job}" for phase, job in ids.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
