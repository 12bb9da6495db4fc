"""Preference data in TRL's standard formats, read from a local file or the Hugging Face hub.

Accepted row shapes (https://huggingface.co/docs/trl/dataset_formats):

- paired, plain text:       {"prompt": str, "chosen": str, "rejected": str}
- paired, conversational:   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                            where a message is {"role": str, "content": str}; chosen/rejected hold the assistant turn(s)
- paired, implicit prompt:  {"chosen": ..., "rejected": ...} (Anthropic HH): the prompt is their common prefix
- unpaired (KTO):           {"prompt": ..., "completion": ..., "label": bool or 0/1}

Everything is rendered to text here (conversations through the tokenizer's chat template), so tokenisation
downstream sees only (prompt, completion) strings. Bad rows are skipped and counted in a SkipReport — never
dropped silently; a file whose schema is wrong, or in which every row is bad, is an error.

Row numbers (`row` fields and SkipReport examples) are 0-based positions in the loaded record list; for a JSONL
file without blank lines, row r is line r + 1.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_lab.data.batches import SkipReport
from rlhf_lab.utils.errors import DataError

ACCEPTED_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_UNPAIRED_COLUMNS = ("prompt", "completion", "label")


@dataclass
class PreferencePair:
    prompt: str  # rendered prompt text (for conversations: chat template with the generation prompt)
    chosen: str  # rendered completion text that follows `prompt` verbatim
    rejected: str
    row: int  # 0-based row in the source records


@dataclass
class UnpairedExample:
    prompt: str
    completion: str
    label: bool  # True = desirable
    row: int


# ---------------------------------------------------------------------------------------------- loading


def load_preference_records(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Read raw rows from a local .jsonl/.json/.parquet file or a hub dataset `owner/name`.

    Returns (rows, display_name). A local path wins over a hub name when both could apply.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_file():
            raise DataError(f"{path} is not a file; expected one of {', '.join(ACCEPTED_SUFFIXES)}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path, split)
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise DataError(
                f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
                f"accepted: {', '.join(ACCEPTED_SUFFIXES)} or a hub dataset name 'owner/name'"
            )
        name = str(path)
    elif _HUB_NAME.match(source) and Path(source).suffix.lower() not in ACCEPTED_SUFFIXES:
        rows = _read_hub(source, split)
        name = f"{source}[{split}]"
    else:
        raise DataError(
            f"preference data {source!r} does not exist; expected a local file "
            f"({', '.join(ACCEPTED_SUFFIXES)}) or a hub dataset name 'owner/name'"
        )
    if not rows:
        raise DataError(f"{name}: contains no rows")
    return rows, name


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, expected an object")
            rows.append(obj)
    return rows


def _read_json(path: Path, split: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); JSON Lines files must end in .jsonl"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get(split), list):
        obj = obj[split]  # {"train": [...], "test": [...]}
    if not isinstance(obj, list):
        raise DataError(
            f"{path}: expected a JSON list of row objects (or {{{split!r}: [...]}}), got a {type(obj).__name__}"
        )
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {i} is a JSON {type(r).__name__}, expected an object")
    return obj


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for corrupt files
        raise DataError(f"{path}: could not be read as parquet ({e})") from None


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
        return ds.to_list()
    except Exception as e:  # noqa: BLE001 — network, auth, missing repo, bad config: all reported the same way
        raise DataError(
            f"preference data {name!r} (split {split!r}) is not a local file and could not be loaded from the "
            f"Hugging Face hub (offline? private? misspelt?): {type(e).__name__}: {e}"
        ) from None


# ---------------------------------------------------------------------------------------------- parsing


def parse_pairs(
    records: Sequence[Mapping[str, Any]], source_name: str, tokenizer: Any = None
) -> tuple[list[PreferencePair], SkipReport]:
    """Render each row to a PreferencePair; bad rows are skipped and counted in the report.

    A row is conversational when any of its fields is a list (of role/content messages); conversational rows
    need `tokenizer` with a chat template. If the first row has no `prompt` column, the dataset is read as
    implicit-prompt (prompt = common prefix of chosen and rejected).
    """
    report = SkipReport(source=source_name, total_rows=len(records))
    if not records:
        raise DataError(f"{source_name}: contains no rows")
    first = records[0]
    _check_schema(first, ("chosen", "rejected"), _PAIR_COLUMNS, source_name, hint_unpaired=True)
    implicit_prompt = "prompt" not in first

    pairs = []
    for row, rec in enumerate(records):
        fields = ("chosen", "rejected") if implicit_prompt and "prompt" not in rec else _PAIR_COLUMNS
        reason = _field_problem(rec, fields)
        if reason:
            report.skip(reason, row)
            continue
        conversational = any(isinstance(rec[k], list) for k in fields)
        if conversational:
            if not all(isinstance(rec[k], list) for k in fields):
                report.skip("row mixes text and message-list fields", row)
                continue
            reason = _messages_problem(rec, fields)
            if reason:
                report.skip(reason, row)
                continue
            if "prompt" in fields:
                prompt_msgs, chosen_msgs, rejected_msgs = rec["prompt"], rec["chosen"], rec["rejected"]
            else:
                prompt_msgs, chosen_msgs, rejected_msgs = _split_common_messages(
                    rec["chosen"], rec["rejected"]
                )
                if not prompt_msgs:
                    report.skip("implicit prompt: chosen and rejected share no leading messages", row)
                    continue
                if not chosen_msgs or not rejected_msgs:
                    report.skip("implicit prompt: one completion is a prefix of the other", row)
                    continue
            _require_chat_template(tokenizer, source_name, row)
            prompt, chosen = _render(tokenizer, prompt_msgs, chosen_msgs, source_name, row)
            _, rejected = _render(tokenizer, prompt_msgs, rejected_msgs, source_name, row)
        else:
            if "prompt" in fields:
                prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
            else:
                prompt, chosen, rejected = _split_common_text(rec["chosen"], rec["rejected"])
                if not prompt:
                    report.skip("implicit prompt: chosen and rejected share no common prefix", row)
                    continue
                if not chosen or not rejected:
                    report.skip("implicit prompt: one completion is a prefix of the other", row)
                    continue
        if chosen == rejected:
            report.skip("chosen identical to rejected", row)
            continue
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, row=row))

    if not pairs:
        raise DataError(f"{source_name}: every row was skipped — {report.summary()}")
    return pairs, report


def parse_unpaired(
    records: Sequence[Mapping[str, Any]], source_name: str, tokenizer: Any = None
) -> tuple[list[UnpairedExample], SkipReport]:
    """KTO-style rows `prompt`/`completion`/`label` (label: bool or 0/1); bad rows skipped and counted."""
    report = SkipReport(source=source_name, total_rows=len(records))
    if not records:
        raise DataError(f"{source_name}: contains no rows")
    _check_schema(records[0], _UNPAIRED_COLUMNS, _UNPAIRED_COLUMNS, source_name, hint_unpaired=False)

    examples = []
    for row, rec in enumerate(records):
        reason = _field_problem(rec, ("prompt", "completion"))
        if reason:
            report.skip(reason, row)
            continue
        label = _as_label(rec.get("label"))
        if label is None:
            report.skip("label missing or not a bool / 0 / 1", row)
            continue
        fields = ("prompt", "completion")
        if any(isinstance(rec[k], list) for k in fields):
            if not all(isinstance(rec[k], list) for k in fields):
                report.skip("row mixes text and message-list fields", row)
                continue
            reason = _messages_problem(rec, fields)
            if reason:
                report.skip(reason, row)
                continue
            _require_chat_template(tokenizer, source_name, row)
            prompt, completion = _render(tokenizer, rec["prompt"], rec["completion"], source_name, row)
        else:
            prompt, completion = rec["prompt"], rec["completion"]
        examples.append(UnpairedExample(prompt=prompt, completion=completion, label=label, row=row))

    if not examples:
        raise DataError(f"{source_name}: every row was skipped — {report.summary()}")
    return examples, report


def load_preference_pairs(
    source: str, split: str = "train", tokenizer: Any = None
) -> tuple[list[PreferencePair], SkipReport]:
    """load_preference_records + parse_pairs."""
    records, name = load_preference_records(source, split)
    return parse_pairs(records, name, tokenizer)


def is_unpaired(records: Sequence[Mapping[str, Any]]) -> bool:
    """KTO-style data (`prompt`/`completion`/`label`, no `chosen`/`rejected`), judged by the first row."""
    first = records[0] if records else {}
    return isinstance(first, Mapping) and {"completion", "label"} <= set(first) and "chosen" not in first


def parse_examples(records: Sequence[Mapping[str, Any]], source_name: str, tokenizer: Any = None
                   ) -> tuple[list[PreferencePair] | list[UnpairedExample], SkipReport]:
    """Pairs (`parse_pairs`) or, for KTO-style rows, unpaired examples (`parse_unpaired`)."""
    parse = parse_unpaired if is_unpaired(records) else parse_pairs
    return parse(records, source_name, tokenizer)


def _check_schema(
    first: Mapping[str, Any],
    required: Sequence[str],
    expected: Sequence[str],
    source: str,
    hint_unpaired: bool,
) -> None:
    if not isinstance(first, Mapping):
        raise DataError(f"{source}: rows must be objects/dicts, the first row is a {type(first).__name__}")
    missing = [c for c in required if c not in first]
    if not missing:
        return
    msg = (
        f"{source}: wrong schema: the first row has columns {sorted(first)} but expected {list(expected)}"
        f" (missing {missing})"
    )
    if hint_unpaired and {"completion", "label"} <= set(first):
        msg += "; this looks like unpaired (KTO) data: prompt/completion/label"
    elif not hint_unpaired and {"chosen", "rejected"} <= set(first):
        msg += "; this looks like paired preference data: prompt/chosen/rejected"
    raise DataError(msg)


def _field_problem(rec: Mapping[str, Any], fields: Iterable[str]) -> str | None:
    """A skip reason if any field is missing, None, empty, or neither text nor a message list."""
    for k in fields:
        if k not in rec or rec[k] is None:
            return f"missing or null '{k}'"
        v = rec[k]
        if not isinstance(v, (str, list)):
            return f"'{k}' is not text or a message list"
        # An empty prompt string is allowed (unconditional generation); an empty completion is not.
        if len(v) == 0 and (k != "prompt" or isinstance(v, list)):
            return f"empty '{k}'"
    return None


ROLES = ("system", "user", "assistant", "tool")


def _messages_problem(rec: Mapping[str, Any], fields: Iterable[str]) -> str | None:
    """A skip reason for message lists: each message {'role': str, 'content': str} with a known role; every
    completion field (not the prompt) holds an assistant turn with some content."""
    for k in fields:
        msgs = rec[k]
        for m in msgs:
            if not (
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                return f"'{k}' has a message that is not {{'role': str, 'content': str}}"
            if m["role"] not in ROLES:
                return f"'{k}' has a message with unknown role (expected one of {', '.join(ROLES)})"
        if k != "prompt" and not any(m["role"] == "assistant" for m in msgs):
            return f"'{k}' has no assistant turn"
        if k != "prompt" and all(not m["content"] for m in msgs):
            return f"empty '{k}'"
    return None


def _as_label(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if type(v).__name__ == "bool_":  # numpy.bool_
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    return None


def _split_common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt: the longest common prefix, cut back to the last whitespace so no word is split.

    The whitespace itself starts the completions (as in TRL's extract_prompt), which suits byte-level BPE
    tokenizers that attach a leading space to the following word.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    if cut > 0:
        cut -= 1  # the whitespace character goes to the completion
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_common_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _require_chat_template(tokenizer: Any, source: str, row: int) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        why = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat_template"
        raise DataError(
            f"{source}: row {row} is conversational (lists of role/content messages) but {why}; "
            "use a tokenizer with a chat template or convert the data to plain-text prompt/chosen/rejected"
        )


def _render(
    tokenizer: Any, prompt_msgs: list, completion_msgs: list, source: str, row: int
) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, completion text) such that prompt + completion = full text."""
    prompt = tokenizer.apply_chat_template(list(prompt_msgs), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        list(prompt_msgs) + list(completion_msgs), tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise DataError(
            f"{source}: row {row}: the chat template's rendering of prompt + completion does not start with its "
            "rendering of the prompt (with add_generation_prompt=True), so the completion cannot be separated; "
            "the template is not prefix-consistent for this conversation (does the completion start with an "
            "assistant turn?)"
        )
    return prompt, full[len(prompt) :]


# ---------------------------------------------------------------------------------------------- writing


def write_pairs_jsonl(path: str | os.PathLike, pairs: Iterable[PreferencePair | Mapping[str, Any]]) -> Path:
    """Write TRL-format rows {"prompt", "chosen", "rejected"} atomically (temp file, fsync, os.replace).

    Items may be PreferencePair or mappings (written as given, so extra columns such as gold scores survive;
    they must contain prompt/chosen/rejected).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, p in enumerate(pairs):
                if isinstance(p, PreferencePair):
                    obj: Mapping[str, Any] = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                else:
                    missing = [c for c in _PAIR_COLUMNS if c not in p]
                    if missing:
                        raise ValueError(f"write_pairs_jsonl: item {i} lacks {missing}")
                    obj = p
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
