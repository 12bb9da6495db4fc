"""Loading and parsing preference data: file formats, schema errors, skipped rows, conversations."""

from __future__ import annotations

import json

import pytest

from rlhf_lab.data.formats import (
    PreferencePair,
    load_preference_pairs,
    load_preference_records,
    parse_pairs,
    parse_unpaired,
    write_pairs_jsonl,
)
from rlhf_lab.utils.errors import DataError
from tests.tokenizers_for_tests import tiny_bpe_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    return tiny_bpe_tokenizer(["the movie was great", "the film was bad", "hello world, how are you"],
                              pad="<pad>", eos="<eos>", bos="<bos>", chat_template=chat_template)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


ROWS = [
    {"prompt": "the movie", "chosen": " was great", "rejected": " was bad"},
    {"prompt": "the film", "chosen": " was fine", "rejected": " was awful"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- loading


def test_load_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    rows, name = load_preference_records(str(path))
    assert rows == ROWS and name == str(path)


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert load_preference_records(str(path))[0] == ROWS


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    rows, _ = load_preference_records(str(path))
    assert rows == ROWS


def test_load_parquet_conversational(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    pairs, _ = load_preference_pairs(str(path), tokenizer=tokenizer)
    assert pairs[0].chosen == "hi<eos>"


def test_load_json_list_and_split_dict(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ROWS))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"train": ROWS[:1], "test": ROWS[1:]}))
    assert load_preference_records(str(a))[0] == ROWS
    assert load_preference_records(str(b), split="test")[0] == ROWS[1:]


def test_missing_path_names_path_and_formats(tmp_path):
    missing = tmp_path / "nope" / "prefs.jsonl"
    with pytest.raises(DataError) as e:
        load_preference_records(str(missing))
    assert str(missing) in str(e.value)
    assert ".jsonl" in str(e.value) and ".parquet" in str(e.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_preference_records(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_preference_records(str(path))


def test_malformed_jsonl_line_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"prompt": oops}\n')
    with pytest.raises(DataError) as e:
        load_preference_records(str(path))
    assert str(path) in str(e.value) and "line 3" in str(e.value)


def test_jsonl_line_not_object(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match="line 2"):
        load_preference_records(str(path))


def test_hub_failure_wrapped(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError) as e:
        load_preference_records("someone/prefs-that-do-not-exist")
    assert (
        "hub" in str(e.value)
        and "offline" in str(e.value)
        and "someone/prefs-that-do-not-exist" in str(e.value)
    )


def test_hub_success(monkeypatch):
    import datasets

    calls = {}

    class FakeDataset:
        def to_list(self):
            return list(ROWS)

    def fake(name, split):
        calls["args"] = (name, split)
        return FakeDataset()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows, name = load_preference_records("owner/name", split="test")
    assert rows == ROWS and calls["args"] == ("owner/name", "test") and name == "owner/name[test]"


# ------------------------------------------------------------------------------------------- parsing


def test_parse_text_pairs():
    pairs, report = parse_pairs(ROWS, "src")
    assert pairs == [
        PreferencePair("the movie", " was great", " was bad", 0),
        PreferencePair("the film", " was fine", " was awful", 1),
    ]
    assert report.num_skipped == 0 and report.total_rows == 2


def test_wrong_schema_lists_columns_and_file():
    with pytest.raises(DataError) as e:
        parse_pairs([{"question": "q", "answer": "a"}], "data/prefs.jsonl")
    msg = str(e.value)
    assert "data/prefs.jsonl" in msg and "question" in msg and "answer" in msg
    assert "chosen" in msg and "rejected" in msg


def test_wrong_schema_hints_unpaired():
    with pytest.raises(DataError, match="unpaired"):
        parse_pairs([{"prompt": "p", "completion": "c", "label": True}], "f")


def test_bad_rows_skipped_and_counted():
    rows = [
        ROWS[0],  # 0 ok
        {"prompt": "p", "chosen": " a"},  # 1 missing rejected
        {"prompt": "p", "chosen": None, "rejected": " b"},  # 2 null chosen
        {"prompt": "p", "chosen": "", "rejected": " b"},  # 3 empty chosen
        {"prompt": "p", "chosen": 3, "rejected": " b"},  # 4 not text
        {"prompt": "p", "chosen": " same", "rejected": " same"},  # 5 identical
        {"chosen": " a", "rejected": " b"},  # 6 missing prompt
        {"prompt": None, "chosen": " a", "rejected": " b"},  # 7 null prompt
        {"prompt": "p", "chosen": " x", "rejected": [{"role": "assistant", "content": "y"}]},  # 8 mixed
        {"prompt": "", "chosen": " a", "rejected": " b"},  # 9 ok: empty prompt text is allowed here
        ROWS[1],  # 10 ok
    ]
    pairs, report = parse_pairs(rows, "src")
    assert [p.row for p in pairs] == [0, 9, 10]
    assert report.total_rows == 11 and report.num_skipped == 8
    assert report.skipped == {
        "missing or null 'rejected'": 1,
        "missing or null 'chosen'": 1,
        "empty 'chosen'": 1,
        "'chosen' is not text or a message list": 1,
        "chosen identical to rejected": 1,
        "missing or null 'prompt'": 2,
        "row mixes text and message-list fields": 1,
    }
    assert report.examples["missing or null 'prompt'"] == [6, 7]
    assert report.examples["chosen identical to rejected"] == [5]
    summary = report.summary()
    assert "kept 3/11" in summary and "[6, 7]" in summary


def test_all_rows_bad_raises_with_summary():
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " a"},
        {"prompt": "p", "chosen": None, "rejected": " a"},
    ]
    with pytest.raises(DataError) as e:
        parse_pairs(rows, "bad.jsonl")
    assert "bad.jsonl" in str(e.value) and "kept 0/2" in str(e.value) and "identical" in str(e.value)


def test_conversational_rendering(tokenizer):
    row = {
        "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hi there"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    pairs, _ = parse_pairs([row], "src", tokenizer)
    (p,) = pairs
    assert p.prompt == "<|system|>be nice<eos><|user|>hello<eos><|assistant|>"
    for completion, msgs in ((p.chosen, row["chosen"]), (p.rejected, row["rejected"])):
        full = tokenizer.apply_chat_template(row["prompt"] + msgs, tokenize=False)
        assert p.prompt + completion == full
    assert p.chosen == "hi there<eos>" and p.rejected == "go away<eos>"


def test_conversational_multi_turn_completion(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    (p,), _ = parse_pairs([row], "src", tokenizer)
    assert p.chosen == "hi<eos><|assistant|>again<eos>"


def test_conversational_bad_messages_skipped(tokenizer):
    good = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    bad_msg = dict(good, chosen=[{"role": "assistant"}])
    empty_content = dict(good, rejected=[{"role": "assistant", "content": ""}])
    empty_list = dict(good, chosen=[])
    pairs, report = parse_pairs([good, bad_msg, empty_content, empty_list], "src", tokenizer)
    assert [p.row for p in pairs] == [0]
    assert report.examples["empty 'chosen'"] == [3]
    assert report.examples["empty 'rejected'"] == [2]
    assert report.num_skipped == 3


def test_conversational_needs_chat_template():
    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    with pytest.raises(DataError, match="no tokenizer"):
        parse_pairs([row], "src")
    with pytest.raises(DataError, match="chat_template"):
        parse_pairs([row], "src", make_tokenizer(chat_template=None))


def test_conversational_template_not_prefix_consistent():
    # The generation prompt says <|assistant|> but assistant turns render as <|bot|>.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|bot|>{% else %}<|{{ m['role'] }}|>{% endif %}"
        "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    with pytest.raises(DataError, match="row 0"):
        parse_pairs([row], "src", make_tokenizer(template))


def test_implicit_prompt_text():
    rows = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: I think so",
            "rejected": "\n\nHuman: hi\n\nAssistant: I don't",
        },
        {
            "chosen": "Human: x Assistant: Hello",
            "rejected": "Human: x Assistant: Help",
        },  # split mid-word → back off
        {"chosen": "abc", "rejected": "xyz"},  # no common prefix → skipped
    ]
    pairs, report = parse_pairs(rows, "hh")
    assert pairs[0] == PreferencePair("\n\nHuman: hi\n\nAssistant: I", " think so", " don't", 0)
    assert pairs[1] == PreferencePair("Human: x Assistant:", " Hello", " Help", 1)
    for p, r in zip(pairs, rows):
        assert p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
    assert report.examples == {"implicit prompt: chosen and rejected share no common prefix": [2]}


def test_implicit_prompt_conversational(tokenizer):
    user = {"role": "user", "content": "hello"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "hi"}],
        "rejected": [user, {"role": "assistant", "content": "no"}],
    }
    (p,), _ = parse_pairs([row], "hh", tokenizer)
    assert p == PreferencePair("<|user|>hello<eos><|assistant|>", "hi<eos>", "no<eos>", 0)


def test_parse_unpaired_labels():
    rows = [
        {"prompt": "p", "completion": " a", "label": True},
        {"prompt": "p", "completion": " b", "label": 0},
        {"prompt": "p", "completion": " c", "label": 1},
        {"prompt": "p", "completion": " d", "label": "yes"},
        {"prompt": "p", "completion": " e", "label": 2},
        {"prompt": "p", "completion": " f", "label": None},
        {"prompt": "p", "completion": " g"},
        {"prompt": "p", "completion": "", "label": True},
    ]
    examples, report = parse_unpaired(rows, "kto")
    assert [(e.completion, e.label, e.row) for e in examples] == [
        (" a", True, 0),
        (" b", False, 1),
        (" c", True, 2),
    ]
    assert report.examples["label missing or not a bool / 0 / 1"] == [3, 4, 5, 6]
    assert report.examples["empty 'completion'"] == [7]
    assert all(type(e.label) is bool for e in examples)


def test_parse_unpaired_wrong_schema_and_conversational(tokenizer):
    with pytest.raises(DataError, match="paired preference data"):
        parse_unpaired([{"prompt": "p", "chosen": "a", "rejected": "b"}], "f")
    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "completion": [{"role": "assistant", "content": "hi"}],
        "label": False,
    }
    (e,), _ = parse_unpaired([row], "f", tokenizer)
    assert (e.prompt, e.completion, e.label) == ("<|user|>hello<eos><|assistant|>", "hi<eos>", False)


# ------------------------------------------------------------------------------------------- writing


def test_write_pairs_jsonl_roundtrip(tmp_path):
    pairs, _ = parse_pairs(ROWS, "src")
    out = tmp_path / "sub" / "pairs.jsonl"
    write_pairs_jsonl(out, pairs + [{"prompt": "q", "chosen": " y", "rejected": " n", "score_chosen": 0.9}])
    rows, _ = load_preference_records(str(out))
    assert rows[:2] == ROWS and rows[2]["score_chosen"] == 0.9
    assert parse_pairs(rows, "x")[0][:2] == pairs
    assert [p.name for p in out.parent.iterdir()] == ["pairs.jsonl"]  # no temp file left behind


def test_write_pairs_jsonl_failure_leaves_old_file(tmp_path):
    out = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(out, [PreferencePair("p", " a", " b", 0)])
    before = out.read_text()
    with pytest.raises(ValueError):
        write_pairs_jsonl(out, [PreferencePair("p", " c", " d", 0), {"prompt": "only"}])
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]
