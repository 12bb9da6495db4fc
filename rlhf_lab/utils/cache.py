"""Content-addressed, crash-safe artifacts on disk.

Every stage output (tokenizer, gold reward, SFT model, preference file, reference log-probs) lives in a
directory named by a hash of the configuration that determines it. A directory is only ever made visible
by an atomic rename once it is complete and holds a `_COMPLETE` marker, so a crash or a kill mid-build
never leaves something that later looks finished.

The marker is a manifest: the directory's name and every file's size at publication. `damage()` compares a
directory with it, so a file truncated or lost afterwards (a partial copy or rsync, a full disk during a manual
edit, a cleaner that deleted part of a cache) or a directory renamed to another key is caught on use and
rebuilt (`reusable`) instead of being used. Sizes, not checksums: they catch that damage in milliseconds even for
a model of many gigabytes; a flipped bit inside a file of the right size is not caught.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rlhf_lab.utils.errors import StorageError, UserError

log = logging.getLogger(__name__)
COMPLETE_MARKER = "_COMPLETE"
LEGACY_MARKER = "ok\n"      # what rlhf_lab wrote before markers became manifests: nothing to verify against
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}   # out of space, out of quota, read-only file system


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object, independent of dict key order."""
    payload = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def is_complete(path: Path) -> bool:
    """The marker is there (cheap; `damage` also checks the files against it)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def mark_complete(directory: Path, published_as: str | None = None) -> None:
    """Write the marker last, as a manifest of what is there now: the name the directory is published under
    (default: its own) and the size of every file below it. Symbolic links are left out: what they point to lives
    elsewhere and may change (W&B links each run's logs/debug-core.log to its shared service log, which grows
    with every later run)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.is_symlink() and p.name != COMPLETE_MARKER}
    manifest = {"published_as": published_as or directory.name, "files": files}
    (directory / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def damage(path: Path) -> str | None:
    """What is wrong with a complete-looking directory (None when its files match its manifest)."""
    path = Path(path)
    try:
        manifest = json.loads((path / COMPLETE_MARKER).read_text())
        published_as, files = manifest["published_as"], manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} manifest is missing or unreadable (written by an older rlhf_lab?)"
    if published_as != path.name:
        return f"it was published as {published_as!r}, not {path.name!r} (renamed or copied to another key?)"
    for name, size in files.items():
        file = path / name
        if file.is_symlink():   # listed by an older rlhf_lab: a link's target is not part of the directory
            continue
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was published (truncated?)"
    return None


def is_legacy(path: Path) -> bool:
    """Published by an rlhf_lab that wrote no manifest: complete then, but unverifiable now."""
    try:
        return (Path(path) / COMPLETE_MARKER).read_text() == LEGACY_MARKER
    except OSError:
        return False


def is_intact(path: Path) -> bool:
    return is_complete(path) and damage(path) is None


def reusable(path: Path, check: Callable[[Path], str | None] | None = None) -> bool:
    """True when `path` is complete and intact (and passes `check`, a caller's own test such as the stage key).
    A complete but damaged directory is moved aside to a hidden `.damaged-*` sibling with a warning that says
    why and where, so the caller rebuilds it; it is never used. Call it holding the lock that guards building
    `path`, so no other process is publishing it at the same time."""
    path = Path(path)
    if not is_complete(path):
        return False
    problem = damage(path) or (check(path) if check is not None else None)
    if problem is None:
        return True
    aside = path.parent / f".damaged-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:   # another process moved it aside first
        return False
    log.warning("%s is damaged: %s. Rebuilding it; the damaged copy is kept in %s (delete it when done)",
                path, problem, aside)
    return False


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a private temporary directory; on clean exit publish it at `final` with a completion marker.

    On an exception the temporary directory is removed and `final` is untouched. If `final` already exists
    and is complete (another process won the race), the new copy is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        mark_complete(tmp, published_as=final.name)
        if final.exists():
            if is_complete(final):
                shutil.rmtree(tmp)
                return
            shutil.rmtree(final)  # a stale, incomplete leftover from a killed build
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in STORAGE_ERRNOS:
            raise StorageError(f"could not write {final} ({e.strerror}: {e.filename or tmp}); nothing was "
                               "published there and what was cached before is intact") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_state_file(path: Path, map_location=None) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only. Anything else (a pickled object, which
    would run code when loaded) is refused with a UserError naming the file."""
    try:
        return torch.load(Path(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refusing to load: it holds more than tensors and plain values (a pickled "
                        f"object would run code when loaded; {str(e).splitlines()[0]})") from None
