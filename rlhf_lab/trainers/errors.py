"""Training failures that end a run with a message rather than a traceback."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops and its directory stays incomplete (never looks finished)."""


class PreemptedError(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was written and the run exits cleanly, to be resumed by rerunning."""
