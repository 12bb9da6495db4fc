"""The study's own bookkeeping, beside its runs: `study.json` (spec, versions, git SHA, wall time per stage and per
run) and `stages.json` (which cached stage directories the study uses).

Several processes update these at once (array tasks finishing, a stages job, the aggregate job), so every update
is a read-modify-write under a file lock, written atomically: a kill never leaves half a JSON file.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from rlhf_lab.utils.cache import atomic_write_text
from rlhf_lab.utils.lock import file_lock

STUDY_RECORD = "study.json"
STAGES_RECORD = "stages.json"


def _update(path: Path, change: Callable[[dict], None]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.lock")):
        data = json.loads(path.read_text()) if path.exists() else {}
        change(data)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))
    return data


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def record_stages(study_dir: Path, outputs: list) -> dict:
    """Remember every stage output (`stages.StageOutput`) the study used. The build time is kept from the run that
    built it; a later lookup only updates `last_lookup_seconds` (how long reuse took)."""

    def change(data: dict) -> None:
        for o in outputs:
            entry = data.setdefault(f"{o.name}/{o.key}", {"stage": o.name, "key": o.key, "dir": str(o.dir)})
            if o.built:
                entry["build_seconds"] = round(o.seconds, 2)
                entry["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            else:
                entry["last_lookup_seconds"] = round(o.seconds, 3)

    return _update(Path(study_dir) / STAGES_RECORD, change)


def record_study(study_dir: Path, **fields) -> dict:
    """Merge top-level fields into study.json; dict-valued fields (run_seconds, phase_seconds) are merged key-wise."""

    def change(data: dict) -> None:
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value

    return _update(Path(study_dir) / STUDY_RECORD, change)


def stage_seconds_by_name(study_dir: Path) -> dict[str, float]:
    """Build wall time per stage name (summed if a study used several versions of one stage)."""
    totals: dict[str, float] = {}
    for entry in read_json(Path(study_dir) / STAGES_RECORD).values():
        if "build_seconds" in entry:
            totals[entry["stage"]] = totals.get(entry["stage"], 0.0) + entry["build_seconds"]
    return totals
