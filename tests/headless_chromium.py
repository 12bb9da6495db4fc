"""Real headless Debian Chromium through selenium + chromedriver, for tests, with no process left behind.

Chromium forks a zygote, GPU/network utility processes and renderers; when chromedriver exits some of them can
outlive it and, re-parented to a PID 1 that never reaps, linger as zombies. So while the browser runs this
process is made a *child subreaper* (prctl), orphans re-parent to it, and `close()` ends and reaps every
descendant it recorded, by pid.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# flags that work in a root container without a display: no network, no first-run or update work in the background
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,1000",
         "--disable-crash-reporter", "--disable-breakpad"]
_PR_SET_CHILD_SUBREAPER = 36


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
    return None


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)


def _children() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(root: int) -> set[int]:
    parents, found, frontier = _children(), set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(proc: tuple[int, int | None]) -> bool:
    """True while (pid, start time) is still that process, running or an unreaped zombie (a reused pid has
    another start time, so it is never mistaken for ours)."""
    pid, started = proc
    return started is not None and _start_time(pid) == started


class HeadlessChromium:
    """A selenium Chrome driver on Debian's chromium; browser console captured through goog:loggingPrefs."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="rlhf-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS + [f"--user-data-dir={self.profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        _set_subreaper(True)
        self._before = descendants(os.getpid())  # anything of ours already running is not the browser's
        # explicit driver path: selenium-manager would otherwise try to download a driver
        self.service = Service(executable_path=CHROMEDRIVER)
        self.driver = webdriver.Chrome(service=self.service, options=options)
        self.driver_pid = self.service.process.pid
        self.started: set[tuple[int, int | None]] = set()
        self._record()

    def _record(self) -> None:
        """Remember the driver, the browser under it and any orphan of theirs re-parented to us."""
        ours = {self.driver_pid} | descendants(self.driver_pid) | (descendants(os.getpid()) - self._before)
        self.started |= {(pid, _start_time(pid)) for pid in ours}

    def console(self) -> list[dict]:
        return self.driver.get_log("browser")

    def close(self, timeout: float = 10.0) -> set[tuple[int, int | None]]:
        """Quit, then end and reap every process the browser ever had; return any that survived (should be none)."""
        self._record()
        try:
            self.driver.quit()
        finally:
            survivors = self._end(self.started, timeout)
            _set_subreaper(False)
            shutil.rmtree(self.profile, ignore_errors=True)
        return survivors

    @staticmethod
    def _end(procs: set[tuple[int, int | None]], timeout: float) -> set[tuple[int, int | None]]:
        deadline = time.monotonic() + timeout
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                if sig is not None and alive(proc):
                    try:
                        os.kill(proc[0], sig)
                    except ProcessLookupError:
                        pass
            while time.monotonic() < deadline:
                for pid, _ in procs:  # reap those re-parented to us; others belong to someone else's wait
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                if not any(alive(p) for p in procs):
                    return set()
                time.sleep(0.1)
            deadline = time.monotonic() + 3.0
        return {p for p in procs if alive(p)}
