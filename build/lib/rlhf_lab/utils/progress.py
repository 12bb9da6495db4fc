"""Long work is never silent: what is running, done / total, rate and ETA.

    with Progress("dpo-beta0.1-seed0 training", total=1000, unit="step", initial=resumed_step) as progress:
        for step in ...:
            ...
            progress.advance()

On a terminal a tqdm bar (stderr). Otherwise (a file, a pipe, SLURM's log, a study's worker processes) a plain log
line every RLHF_LAB_PROGRESS_SECONDS (default 30) and a last one when it ends, so a long phase always says how far
it is and a short one stays quiet. RLHF_LAB_PROGRESS=lines forces the lines, =off silences both.

Whatever runs inside `reporting_to(path)` also keeps a small JSON snapshot at `path` (the run directory's
progress.json, a stage's `.KEY.progress.json`, the study's progress.json), so `rlhf-lab status` can show the
same figures for a study running elsewhere. Only the main rank reports.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from rlhf_lab.distributed import comm

log = logging.getLogger(__name__)
T = TypeVar("T")

MODE_ENV, SECONDS_ENV = "RLHF_LAB_PROGRESS", "RLHF_LAB_PROGRESS_SECONDS"
SNAPSHOT_EVERY_S = 2.0        # how often the JSON snapshot is rewritten (cheap, but not on every step)
_snapshot_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("progress_file", default=None)


@contextlib.contextmanager
def reporting_to(path: Path) -> Iterator[None]:
    """Progress made inside this block is also written to `path` (atomically) for `rlhf-lab status`."""
    token = _snapshot_file.set(Path(path))
    try:
        yield
    finally:
        _snapshot_file.reset(token)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def describe(snapshot: dict) -> str:
    """'training 30/100 steps (30%), 2.10 steps/s, ETA 0:00:33' from a snapshot (or a live Progress)."""
    done, total, units = snapshot["done"], snapshot["total"], plural(snapshot["unit"])
    text = f"{snapshot['what']} {done}/{total} {units}"
    if total:
        text += f" ({100 * done / total:.0f}%)"
    if snapshot.get("rate"):
        rate = snapshot["rate"]
        text += f", {rate:.0f} {units}/s" if rate >= 100 else f", {rate:.2f} {units}/s"
    if snapshot.get("eta_s") is not None and done < total:
        text += f", ETA {format_duration(snapshot['eta_s'])}"
    return text


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")


class Progress:
    """done / total of one piece of long work, reported as a bar, as periodic lines and as a snapshot file."""

    def __init__(self, what: str, total: int, unit: str = "step", initial: int = 0):
        self.what, self.total, self.unit = what, int(total), unit
        self.done = self._initial = int(initial)
        self._started = self._last_line = self._last_snapshot = time.monotonic()
        self._lines_printed, self._last_line_done = 0, None
        self._file = _snapshot_file.get()
        mode = os.environ.get(MODE_ENV, "auto")
        self._enabled = comm.is_main() and mode != "off"
        self._interval = float(os.environ.get(SECONDS_ENV, "30"))
        self._bar = None
        if self._enabled and mode != "lines" and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=what, unit=unit, leave=False,
                             dynamic_ncols=True, file=sys.stderr)
        self._write_snapshot()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def snapshot(self) -> dict:
        elapsed = time.monotonic() - self._started
        rate = (self.done - self._initial) / elapsed if elapsed > 0 and self.done > self._initial else None
        eta = (self.total - self.done) / rate if rate else None
        return {"what": self.what, "done": self.done, "total": self.total, "unit": self.unit, "rate": rate,
                "eta_s": eta, "elapsed_s": elapsed, "pid": os.getpid(), "host": socket.gethostname(),
                "updated": time.time()}

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self._enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(n)
        elif now - self._last_line >= self._interval:
            self._line()
        if now - self._last_snapshot >= SNAPSHOT_EVERY_S or self.done >= self.total:
            self._write_snapshot()

    def close(self) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._lines_printed and self._last_line_done != self.done:   # a reported phase says that it ended
            self._line()
        self._write_snapshot()
        self._enabled = False

    def _line(self) -> None:
        log.info("progress: %s", describe(self.snapshot()))
        self._last_line, self._lines_printed, self._last_line_done = time.monotonic(), self._lines_printed + 1, self.done

    def _write_snapshot(self) -> None:
        if self._file is None or not self._enabled:
            return
        from rlhf_lab.utils.cache import atomic_write_text

        self._last_snapshot = time.monotonic()
        try:
            atomic_write_text(self._file, json.dumps(self.snapshot()))
        except OSError as e:   # progress is a courtesy: a full disk must fail the work itself, not its report
            log.debug("could not write progress to %s: %s", self._file, e)


def track(items: Iterable[T], what: str, total: int, unit: str) -> Iterator[T]:
    """Iterate `items`, advancing a Progress by one per item."""
    with Progress(what, total, unit) as progress:
        for item in items:
            yield item
            progress.advance()


def read_snapshot(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
