"""A real single-node SLURM cluster on localhost, private to one test session (or to you, by hand).

    python -m tests.slurm_cluster DIR     start one in DIR, print `export SLURM_CONF=...`, stop it on Ctrl-C

Everything lives in one private directory: a fresh munge key, munged with its own socket, slurm.conf (the
configuration that works on a single container without systemd: auth/munge, linuxproc, no accounting), state, spool, logs
and pid files, on free ports, so it never touches a system-wide munge or slurm.

The daemons run in the foreground under a small supervisor process that makes itself the *child subreaper*: slurmd
double-forks a slurmstepd per job, and on machines whose PID 1 does not reap orphans (this one) every finished job
would otherwise leave a zombie. The supervisor reaps them all, and on SIGTERM stops exactly the daemons it started
(by the pids in their pid files, checked against its own children), so a test leaves no daemon and no zombie behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
DAEMONS = ("munged", "slurmctld", "slurmd")   # start order; stopped in reverse


def slurm_available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot (for a pytest skip)."""
    missing = [cmd for cmd in ("sbatch", "slurmctld", "slurmd", "munged") if not shutil.which(cmd)]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): `make setup` installs Debian's "
                f"slurm-wlm and munge when run as root")
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (SlurmUser=root, slurmd launches jobs)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- configuration
def write_config(root: Path) -> dict[str, Path]:
    """Create the private directory layout, munge key and slurm.conf; returns the paths the daemons need."""
    root = Path(root).resolve()
    paths = {name: root / name for name in ("munge", "socket", "state", "spool", "log", "run")}
    for name, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        # munged refuses a key directory others can read, and a socket directory others can write
        path.chmod(0o700 if name == "munge" else 0o755)
    key = paths["munge"] / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    host = socket.gethostname()
    sock = paths["socket"] / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=rlhflab-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# a test cluster: schedule often, forget finished jobs only after the test has read them
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=10
StateSaveLocation={paths['state']}
SlurmdSpoolDir={paths['spool']}/slurmd-%n
SlurmctldPidFile={paths['run']}/slurmctld.pid
SlurmdPidFile={paths['run']}/slurmd.pid
SlurmctldLogFile={paths['log']}/slurmctld.log
SlurmdLogFile={paths['log']}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return {**paths, "conf": conf, "key": key, "sock": sock}


def daemon_commands(p: dict[str, Path]) -> dict[str, list[str]]:
    """Foreground command lines, so each daemon is a direct child of the supervisor."""
    return {
        "munged": ["munged", "--foreground", "--force", f"--socket={p['sock']}", f"--key-file={p['key']}",
                   f"--pid-file={p['run']}/munged.pid", f"--log-file={p['log']}/munged.log",
                   f"--seed-file={p['munge']}/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", str(p["conf"])],   # -i: ignore state from an earlier run
        "slurmd": ["slurmd", "-D", "-f", str(p["conf"])],
    }


# ----------------------------------------------------------------------------------------------- supervisor
def _reap_all() -> None:
    """Collect every exited child (daemons and reparented slurmstepd orphans); never blocks."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _children(pid: int) -> list[int]:
    """Live (non-zombie) direct children of `pid`, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(stat.parent.name))
    return kids


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        _reap_all()
        pids = [p for p in pids if p in _children(os.getpid())]
        time.sleep(0.1)
    return pids


def _pid_from_file(path: Path, started: dict[int, str]) -> int | None:
    """The pid a daemon wrote, trusted only if it is one this supervisor started."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        return pid if pid in started else None
    return None


def supervise(root: Path) -> None:
    """Start the daemons, reap orphans until SIGTERM/SIGINT, then stop exactly what was started."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    paths = write_config(root)
    env = {**os.environ, "SLURM_CONF": str(paths["conf"])}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    started: dict[int, str] = {}
    for name, cmd in daemon_commands(paths).items():
        with open(paths["log"] / f"{name}.stdout", "ab") as out:
            started[subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).pid] = name
        if name == "munged":   # slurm daemons authenticate through munged's socket from their first call
            _wait_for(paths["sock"].exists, 10, f"munged socket {paths['sock']}")
    (paths["run"] / "supervisor.ready").write_text(str(os.getpid()))
    while not stop:
        _reap_all()
        if not any(p in _children(os.getpid()) for p in started):
            break   # every daemon died: nothing left to supervise (their logs say why)
        time.sleep(0.2)
    stop_daemons(paths, started)


def stop_daemons(paths: dict[str, Path], started: dict[int, str]) -> None:
    """SIGTERM each daemon (reverse start order) by its pid file, SIGKILL what outlives 15 s, reap the rest."""
    for name in reversed(DAEMONS):
        pid = _pid_from_file(paths["run"] / f"{name}.pid", started)
        pid = pid or next((p for p, n in started.items() if n == name), None)  # died before writing its pid file
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for survivor in _wait_gone([pid], 15):
            with contextlib.suppress(ProcessLookupError):
                os.kill(survivor, signal.SIGKILL)
    # whatever slurmd left behind (a slurmstepd of a cancelled job) was reparented to us: end it, then reap it
    leftovers = _wait_gone(_children(os.getpid()), 5)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(leftovers, 5)
    _reap_all()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------- client side
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class LocalCluster:
    """Start the supervisor in `root`, wait until the node is idle; `env` then points SLURM clients at it."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> LocalCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "supervisor.log", "ab") as log:
            # its own session: a Ctrl-C in the terminal reaches the supervisor only through stop()
            self.proc = subprocess.Popen([sys.executable, __file__, "supervise", str(self.root)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: self.node_state() == "idle" or self.proc.poll() is not None, timeout, "an idle node")
            if self.proc.poll() is not None:
                raise RuntimeError(f"the SLURM daemons did not start:\n{self.logs()}")
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=30)

    def node_state(self) -> str:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    def job_states(self, job_id: str) -> dict[str, str]:
        """{job id (array tasks as A_I): state} for a job or every task of an array, from slurmctld's memory
        (sacct needs accounting, which this cluster has not); pending jobs that can never run count as failed."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        states = {}
        for line in out.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId')}_{task}" if task and fields.get("ArrayJobId") else fields.get("JobId")
            state = fields.get("JobState", "?")
            if state == "PENDING" and fields.get("Reason") == "DependencyNeverSatisfied":
                state = "DEPENDENCY_NEVER_SATISFIED"
            states[key] = state
        return states

    def wait(self, job_ids: list[str], timeout: float) -> dict[str, str]:
        """Poll until every task of every job is finished; returns their final states."""
        deadline = time.time() + timeout
        while True:
            states = {k: v for j in job_ids for k, v in self.job_states(j).items()}
            done = states and all(s in TERMINAL or s == "DEPENDENCY_NEVER_SATISFIED" for s in states.values())
            if done or time.time() > deadline:
                return states
            time.sleep(1)

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "supervisor.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job of this private cluster, then have the supervisor stop its daemons and exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.node_state():
            self.run("scancel", "--user", str(os.getuid()), check=False)
            _wait_for_quietly(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 20)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:   # the supervisor itself hung: kill it (its daemons may outlive it)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private cluster for the test session (SLURM_CONF in `.env`), stopped at its end."""
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _wait_for_quietly(predicate, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        _wait_for(predicate, timeout, "")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "supervise":
        supervise(Path(argv[1]))
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` stops the cluster as Ctrl-C does
    cluster = LocalCluster(Path(argv[0])).start()
    print(f"export SLURM_CONF={cluster.conf}    # the cluster runs until Ctrl-C", flush=True)
    try:
        while cluster.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
