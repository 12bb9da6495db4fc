"""Per-sample evaluation records on disk: `<run_dir>/samples/step_{step:06d}.jsonl`, one JSON object per line.

Fields: index (row of the evaluation, the same prompt at every step), prompt, completion (text, special tokens
dropped), gold (gold reward of prompt + completion, null without a task), length (completion tokens, EOS
included), temperature. Step 0 is the SFT model on the same prompts at the same temperature: the natural
baseline of judge win rates (rlhf_lab.judges.study).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf_lab.utils.cache import atomic_write_text
from rlhf_lab.utils.errors import DataError

SAMPLES_DIR = "samples"
REQUIRED_FIELDS = ("index", "prompt", "completion", "length")
_STEP_FILE = re.compile(r"step_(\d+)\.jsonl")


def samples_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step_{step:06d}.jsonl"


def write_samples(run_dir: Path, step: int, records: list[dict]) -> Path:
    """Write one evaluation's records atomically (readers never see half a file)."""
    return write_records(samples_path(run_dir, step), records)


def write_records(path: Path, records: list[dict]) -> Path:
    """Records as JSON lines, written atomically (the format read_samples reads)."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def sample_steps(run_dir: Path) -> list[int]:
    """Steps with a samples file, ascending."""
    folder = Path(run_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := _STEP_FILE.fullmatch(f.name)))


def read_samples(path: Path) -> list[dict]:
    """Records of one file; a bad line raises DataError naming the file, line and field."""
    path = Path(path)
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        missing = [k for k in REQUIRED_FIELDS if k not in record]
        if missing:
            raise DataError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
        records.append(record)
    return records
