"""Training failures that end a run with a message rather than a traceback."""
from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops and its directory stays incomplete (never looks finished)."""


class PreemptedError(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was written and the run exits cleanly, to be resumed by rerunning.

    `requeue_signal`: submitit's preemption signal, when that was the request; the process delivers it to itself
    once the run has unwound, so submitit's handler (back in place) requeues the job (trainers/loop.StopRequest)."""

    def __init__(self, message: str, requeue_signal: int | None = None):
        super().__init__(message)
        self.requeue_signal = requeue_signal
