"""Atomic training checkpoints for exact resume.

A checkpoint is a directory `checkpoints/step-000012/` holding `state.pt` (everything a loop needs to continue
bit-for-bit on CPU: models, optimisers, schedulers, controller state, RNG states, data cursor, step), published by
`atomic_dir` — a crash or SIGKILL mid-save leaves only a hidden temporary directory, never a checkpoint that looks
complete. Older checkpoints beyond `keep` are removed only after a newer one is complete.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rlhf_lab.utils.cache import atomic_dir, is_complete

_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    final = Path(root) / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary or half-written ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / "state.pt", weights_only=False)
