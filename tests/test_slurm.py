"""On a real SLURM cluster (a private single-node one on localhost, tests/slurm_cluster.py): a study as
stages → array → aggregate jobs through slurm/array.sbatch, and a Hydra sweep through hydra/launcher=slurm.

Skipped only where SLURM is not installed (`make setup` installs Debian's slurm-wlm and munge as root).
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_lab.study.slurm import submit_study
from tests.cli import CONSOLE, cli_env, run_cli
from tests.slurm_cluster import slurm_available, slurm_cluster  # noqa: F401 — the session fixture

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(slurm_available() is not None, reason=slurm_available() or "")]
WAIT_S = 240   # generous: the jobs share 2 cores with whatever else runs


def rlhf_lab(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(list(args), REPO, timeout=timeout, env={**cli_env(), **(env or {})})


def smoke_subset(tmp: Path, arms: tuple[str, ...]) -> Path:
    """The smoke study (its tiny overrides, kept in step with it) restricted to a few arms: 3 sweep points."""
    spec = yaml.safe_load((REPO / "conf" / "studies" / "smoke.yaml").read_text())
    spec["name"] = "smoke_slurm"
    spec["arms"] = {arm: spec["arms"][arm] for arm in arms}
    path = tmp / "smoke_slurm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def count_in_logs(paths, pattern: str) -> dict[str, int]:
    counts = {}
    for path in paths:
        n = len(re.findall(pattern, Path(path).read_text(errors="replace")))
        if n:
            counts[Path(path).name] = n
    return counts


def assert_all_completed(cluster, states: dict[str, str], logs: list[Path]) -> None:
    bad = {job: state for job, state in states.items() if state != "COMPLETED"}
    if bad or not states:
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.is_file())
        pytest.fail(f"jobs not completed: {bad or 'none found'}\n{tails}\n{cluster.logs()}")


# ------------------------------------------------------------------------------------------ the sbatch array
@pytest.fixture(scope="module")
def array_study(slurm_cluster, tmp_path_factory):  # noqa: F811
    """Submit the 3-point study once (stages → array → aggregate) and wait for all of it."""
    tmp = tmp_path_factory.mktemp("array")
    study = smoke_subset(tmp, ("dpo", "ipo"))
    overrides = [f"output_root={tmp / 'out'}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        # 1 core per job: the two array tasks run at once on this 2-core node
        ids = submit_study(str(study), overrides, ["--cpus-per-task=1", "--mem=2G", "--time=10"])
    states = slurm_cluster.wait(list(ids.values()), WAIT_S)
    study_dir = tmp / "out" / "smoke_slurm"
    return {"ids": ids, "states": states, "study": study, "overrides": overrides, "dir": study_dir,
            "logs": sorted((study_dir / "slurm").glob("*.out"))}


def test_array_jobs_complete_and_map_tasks_to_sweep_points(array_study, slurm_cluster):  # noqa: F811
    s = array_study
    assert_all_completed(slurm_cluster, s["states"], s["logs"])
    run_ids = rlhf_lab("study", f"study={s['study']}", "phase=list", *s["overrides"]).stdout.split()
    assert run_ids == ["dpo-beta0.1-seed0", "dpo-beta1-seed0", "ipo-beta0.5-seed0"]
    # one array task per sweep point, task I ran `phase=point index=I`
    array_tasks = sorted(k for k in s["states"] if k.startswith(f"{s['ids']['points']}_"))
    assert array_tasks == [f"{s['ids']['points']}_{i}" for i in range(len(run_ids))]
    for i in range(len(run_ids)):
        log = s["dir"] / "slurm" / f"point-{s['ids']['points']}_{i}.out"
        assert f"phase=point index={i}" in log.read_text()
    for run_id in run_ids:
        assert (s["dir"] / "runs" / run_id / "_COMPLETE").is_file(), run_id


def test_aggregate_job_writes_the_study_points_table(array_study, slurm_cluster):  # noqa: F811
    s = array_study
    assert_all_completed(slurm_cluster, s["states"], s["logs"])
    with open(s["dir"] / "points.csv") as f:
        rows = list(csv.DictReader(f))
    per_run = {}
    for row in rows:
        per_run.setdefault(row["run_id"], []).append(int(row["step"]))
    # every point evaluated at step 0, every 2 steps and at the end (3 steps), collected by the aggregate job
    assert per_run == {run: [0, 2, 3] for run in ("dpo-beta0.1-seed0", "dpo-beta1-seed0", "ipo-beta0.5-seed0")}
    assert {r["study"] for r in rows} == {"smoke_slurm"}
    assert "points table" in (s["dir"] / "slurm" / f"aggregate-{s['ids']['aggregate']}.out").read_text()


def test_stages_are_built_once_by_the_stages_job(array_study, slurm_cluster):  # noqa: F811
    s = array_study
    assert_all_completed(slurm_cluster, s["states"], s["logs"])
    stages_log = f"stages-{s['ids']['stages']}.out"
    for stage in ("sft", "preferences", "reference_logps"):
        assert count_in_logs(s["logs"], rf"building stage {stage} ") == {stages_log: 1}, stage


# ------------------------------------------------------------------------------------------ Hydra + submitit
TINY = [
    "model=gpt2_micro", "logger=none", "task.max_train_reviews=2000", "task.vocab_size=512",
    "task.num_train_prompts=48", "task.num_test_prompts=16", "sft.steps=20", "sft.batch_size=16", "sft.seq_len=32",
    "preferences.max_new_tokens=12", "data.max_completion_length=13", "train.steps=3", "train.batch_size=8",
    "train.micro_batch_size=4", "eval.every=2", "eval.max_new_tokens=12",
]


def job_times(cluster, job_id: str) -> list[tuple[str, str]]:
    """(StartTime, EndTime) of every task of a job, ISO strings (comparable as text)."""
    out = cluster.run("scontrol", "-o", "show", "job", job_id).stdout
    return [(re.search(r"StartTime=(\S+)", line)[1], re.search(r"EndTime=(\S+)", line)[1])
            for line in out.splitlines()]


@pytest.mark.slow   # minutes of CI budget; run with `make test TEST_ARGS="-m slow"`
def test_hydra_submitit_sweep_shares_stages_under_the_lock(slurm_cluster, tmp_path):  # noqa: F811
    """Two points submitted at once as a submitit array, on an empty stage cache: both run concurrently, one
    builds each shared stage and the other waits on the lock and reuses it."""
    sweep = tmp_path / "multirun"
    rlhf_lab("-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
             "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", *TINY, f"output_root={tmp_path}",
             "algo.beta=0.1,1.0", env=slurm_cluster.env, timeout=WAIT_S)
    for num, beta in ((0, 0.1), (1, 1.0)):
        run = sweep / str(num)
        assert (run / "_COMPLETE").is_file(), f"point {num} did not complete"
        assert yaml.safe_load((run / "config.yaml").read_text())["algo"]["beta"] == beta
    job_ids = sorted({p.parent.name for p in (sweep / ".submitit").glob("*/*_log.out")})   # "<array>_<task>"
    assert len(job_ids) == 2, job_ids        # one array task per point
    (start_a, end_a), (start_b, end_b) = [job_times(slurm_cluster, j)[0] for j in job_ids]
    assert start_a < end_b and start_b < end_a, "the two points did not run at the same time"
    logs = sorted((sweep / ".submitit").glob("*/*_log.*"))
    for stage in ("sft", "preferences", "reference_logps"):
        built = count_in_logs(logs, rf"building stage {stage} ")
        assert sum(built.values()) == 1, f"stage {stage} built {built} times"
    assert len([d for d in (tmp_path / "cache" / "sft").iterdir() if not d.name.startswith(".")]) == 1


# ------------------------------------------------------------------------------------------ time limit
def wait_for(predicate, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what} not seen after {timeout:.0f} s"
        time.sleep(0.2)


def wait_for_text(path: Path, text: str, timeout: float = WAIT_S) -> None:
    wait_for(lambda: path.is_file() and text in path.read_text(errors="replace"), f"{text!r} in {path}", timeout)


def restart_soon(cluster, job: str) -> None:
    """slurmctld makes a requeued job wait ~2 minutes (BeginTime) before it may start again: shorten that to a
    few seconds (not 0: slurmd rejects a relaunch in the same second as the revoked credential of the first)."""
    wait_for(lambda: cluster.job_states(job).get(job) == "PENDING", f"job {job} pending again", 30)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now+3")


@pytest.mark.slow   # minutes of CI budget; run with `make test TEST_ARGS="-m slow"`
def test_time_limit_signal_checkpoints_requeues_and_resumes_ppo(slurm_cluster, array_study, tmp_path):  # noqa: F811
    """The template as a user submits it by hand: a PPO sweep point gets the time-limit warning (USR1 to the batch
    shell, what --signal=B:USR1@120 sends), checkpoints, exits 0, requeues itself, and the rerun resumes."""
    spec = yaml.safe_load(smoke_subset(tmp_path, ("ppo",)).read_text())
    spec["overrides"] += ["train.steps=60", "eval.every=1000"]      # long enough to be interrupted
    study = tmp_path / "ppo.yaml"
    study.write_text(yaml.safe_dump(spec))
    log = tmp_path / "ppo.out"
    env = {**slurm_cluster.env, "STUDY": str(study), "RLHF_LAB_VENV": sys.prefix}
    # the SFT and preference stages of the array study are reused (only the reward model is new)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0", f"--output={log}", "--cpus-per-task=1", "--mem=2G", "--time=10",
         str(REPO / "slurm" / "array.sbatch"), f"output_root={tmp_path}",
         f"cache_dir={array_study['dir'].parent / 'cache'}"],
        env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    job = f"{submitted.stdout.strip()}_0"
    wait_for_text(log, "step 0: gold", WAIT_S)                       # training has started
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    wait_for_text(log, "requeueing", WAIT_S)
    restart_soon(slurm_cluster, job)
    states = slurm_cluster.wait([job], WAIT_S)
    text = log.read_text(errors="replace")
    assert states == {job: "COMPLETED"}, f"{states}\n{text[-3000:]}"
    assert "USR1 received: will checkpoint" in text and "requeueing" in text
    assert "restart 1 on" in text and re.search(r"resumed from \S+ \(step [1-9]\d*\)", text), text[-3000:]
    run = tmp_path / "smoke_slurm" / "runs" / "ppo-kl_coef0.05-seed0"
    assert (run / "_COMPLETE").is_file()
    with open(run / "points.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 60]   # step 0 once (not re-evaluated on resume)


def only_entry(directory: Path) -> Path:
    entries = list(directory.iterdir())
    assert len(entries) == 1, f"expected one entry in {directory}, found {sorted(e.name for e in entries)}"
    return entries[0]


@pytest.mark.slow   # minutes of CI budget; run with `make test TEST_ARGS="-m slow"`
def test_hydra_submitit_requeue_resumes_into_its_own_run_directory(slurm_cluster, tmp_path):  # noqa: F811
    """submitit's preemption signal (USR2, what `signal_delay_s` before the time limit sends) mid-training: the
    point checkpoints at the end of its step, submitit requeues it, and the rerun resumes in the same
    `<sweep dir>/0/` under the default, time-stamped hydra.sweep.dir (nothing pinned)."""
    # no periodic checkpoint before the last step: a resume from step N ≥ 1 can only come from the signal's
    sweep_cmd = [str(CONSOLE), "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
                 "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10", *TINY, "train.steps=300",
                 "train.checkpoint_every=300", "eval.every=1000", f"output_root={tmp_path}", "algo.beta=0.1"]
    sweep = subprocess.Popen(sweep_cmd, cwd=REPO, env={**cli_env(), **slurm_cluster.env}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)     # waits for the array, as users see it
    try:
        wait_for(lambda: (tmp_path / "multirun").is_dir() and any((tmp_path / "multirun").iterdir()), "a sweep dir")
        sweep_dir = only_entry(tmp_path / "multirun")
        metrics = sweep_dir / "0" / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and '"train/loss"' in metrics.read_text(), "a training step")
        job, = {p.parent.name for p in (sweep_dir / ".submitit").glob("*/*_log.out")}   # one point: a plain job
        # to the job steps (not --batch): submitit's handler lives in the Python process srun started
        slurm_cluster.run("scancel", "--signal=USR2", job)
        restart_soon(slurm_cluster, job)
        out, _ = sweep.communicate(timeout=WAIT_S)
    finally:
        sweep.kill()
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*")))
    assert sweep.returncode == 0, f"{out[-3000:]}\n{logs[-3000:]}"
    assert slurm_cluster.wait([job], 30) == {job: "COMPLETED"}     # the result is read before the job ends
    assert only_entry(tmp_path / "multirun") == sweep_dir            # the rerun found the same time-stamped dir
    run = sweep_dir / "0"
    assert (run / "_COMPLETE").is_file()
    signalled = re.search(r"USR2 received: will checkpoint.*?checkpointed at step (\d+)", logs, re.DOTALL)
    assert signalled and "Requeued job" in logs, logs[-3000:]
    assert re.search(rf"resumed from \S+ \(step {signalled[1]}\)", logs), logs[-3000:]
    assert int(signalled[1]) >= 1
    with open(run / "points.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 300]   # step 0 once (not re-evaluated)


# ------------------------------------------------------------------------------------------ multi-process points
@pytest.mark.slow   # the CI budget: the submitit point on two tasks below trains data-parallel under SLURM too
def test_point_with_two_processes_runs_as_two_srun_tasks(slurm_cluster, array_study, tmp_path):  # noqa: F811
    """`resources: {processes: 2}`: the array task gets 2 SLURM tasks, the template starts one rank per task with
    srun (RANK from SLURM_PROCID, rendezvous on the first node) and the point trains data-parallel."""
    spec = yaml.safe_load(smoke_subset(tmp_path, ("dpo",)).read_text())
    spec["name"], spec["arms"]["dpo"]["sweep"] = "two_tasks", {"algo.beta": [0.1]}
    spec["resources"] = {"processes": 2, "cpus_per_process": 1}
    study = tmp_path / "two_tasks.yaml"
    study.write_text(yaml.safe_dump(spec))
    overrides = [f"output_root={tmp_path}", f"cache_dir={array_study['dir'].parent / 'cache'}", "train.device=cpu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        ids = submit_study(str(study), overrides, ["--cpus-per-task=1", "--mem=4G", "--time=10"])
    logs = lambda: sorted((tmp_path / "two_tasks" / "slurm").glob("*.out"))  # noqa: E731
    states = slurm_cluster.wait(list(ids.values()), WAIT_S)
    assert_all_completed(slurm_cluster, states, logs())
    point_log = next(p for p in logs() if p.name.startswith("point-")).read_text(errors="replace")
    assert "point on 2 tasks over 1 node(s)" in point_log, point_log[-2000:]
    run = tmp_path / "two_tasks" / "runs" / "dpo-beta0.1-seed0"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert (tmp_path / "two_tasks" / "points.csv").is_file()


def test_hydra_submitit_point_on_two_tasks_trains_data_parallel(slurm_cluster, array_study, tmp_path):  # noqa: F811
    """hydra/launcher=slurm with tasks_per_node=2: both SLURM tasks of the point join one process group (ranks
    from SLURM's variables) and train it data-parallel; rank 0 alone writes the run directory."""
    sweep = tmp_path / "multirun"
    rlhf_lab("-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
             "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", *TINY,
             f"output_root={tmp_path}", f"cache_dir={array_study['dir'].parent / 'cache'}", "train.device=cpu",
             "algo.beta=0.1", env=slurm_cluster.env, timeout=WAIT_S)
    run = sweep / "0"
    assert (run / "_COMPLETE").is_file(), "the point did not complete"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
