"""Checkpoint files: RNG capture/restore, the complete checkpoints of a run, and safe reading.

A checkpoint is a directory `checkpoints/step-000012/` published atomically by `trainers.loop.Checkpointer` (a
crash or SIGKILL mid-save leaves only a hidden temporary directory, never a checkpoint that looks complete).
Every file of ours in it holds only tensors, numbers, strings and containers of them, and is read with
`torch.load(weights_only=True)`: a checkpoint that someone replaced with a pickle payload is refused, never run.
(DeepSpeed reads its own engine files inside `engine.load_checkpoint`.)
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rlhf_lab.utils.cache import damage, is_complete

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG a loop draws from, in weights_only-loadable types (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)),
             "torch": torch.get_rng_state(), "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete, intact checkpoint directories, oldest first. Temporary or half-written ones are ignored; one
    whose files no longer match its manifest is skipped with a warning (the previous one is resumed instead)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if (match := _STEP_DIR.match(path.name)) and is_complete(path):
            problem = damage(path)
            if problem is None:
                found.append((int(match.group(1)), path))
            else:
                log.warning("checkpoint %s is damaged (%s): not resuming from it", path, problem)
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None
