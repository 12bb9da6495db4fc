"""Content-addressed, crash-safe artifacts on disk.

Every stage output (tokenizer, gold reward, SFT model, preference file, reference log-probs) lives in a
directory named by a hash of the configuration that determines it. A directory is only ever made visible
by an atomic rename once it is complete and holds a `_COMPLETE` marker, so a crash or a kill mid-build
never leaves something that later looks finished.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf_lab.utils.errors import StorageError, UserError

COMPLETE_MARKER = "_COMPLETE"
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}   # out of space, out of quota, read-only file system


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object, independent of dict key order."""
    payload = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


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
        (tmp / COMPLETE_MARKER).write_text("ok\n")
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
