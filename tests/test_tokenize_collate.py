"""Tokenisation (bos/eos, truncation policy, skips) and collation into the documented batch layout."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_lab.data.batches import TokenizedPair, TokenizedUnpaired
from rlhf_lab.data.collate import batches, collate_pairs, collate_sequences, collate_unpaired
from rlhf_lab.data.formats import PreferencePair, UnpairedExample, load_preference_pairs
from rlhf_lab.data.tokenize import (
    TruncationConfig,
    adds_bos,
    encode_prompt,
    tokenize_pairs,
    tokenize_unpaired,
)
from rlhf_lab.utils.errors import DataError
from tests.tokenizers_for_tests import tiny_bpe_tokenizer

PAD, EOS, BOS = 0, 1, 2


def make_tokenizer(add_bos: bool = False):
    hf = tiny_bpe_tokenizer(["the movie was great", "the film was bad", "hello world, how are you"],
                            pad="<pad>", eos="<eos>", bos="<bos>", add_bos=add_bos)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (PAD, EOS, BOS)
    return hf


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    return make_tokenizer(add_bos=True)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- tokenize


def test_eos_appended_no_special_tokens(tok):
    pairs = [PreferencePair("the movie", " was great", " was bad", row=7)]
    (tp,), report = tokenize_pairs(pairs, tok, TruncationConfig())
    assert not adds_bos(tok)
    assert tp.prompt_ids == ids(tok, "the movie")
    assert tp.chosen_ids == ids(tok, " was great") + [EOS]
    assert tp.rejected_ids == ids(tok, " was bad") + [EOS]
    assert tp.index == 7
    assert report.num_skipped == 0 and report.truncated == {}


def test_bos_prepended_only_when_tokenizer_adds_it(bos_tok):
    assert adds_bos(bos_tok)
    pairs = [
        PreferencePair("the movie", " was great", " was bad", 0),
        PreferencePair("<bos>the film", " a", " b", 1),
    ]
    out, _ = tokenize_pairs(pairs, bos_tok, TruncationConfig())
    assert out[0].prompt_ids == [BOS] + ids(bos_tok, "the movie")
    assert out[1].prompt_ids == [BOS] + ids(
        bos_tok, "the film"
    )  # already rendered by a template: not doubled
    assert out[0].chosen_ids[0] != BOS
    assert encode_prompt(bos_tok, "the movie") == out[0].prompt_ids


def test_truncate_keeps_prompt_end_and_completion_start(tok):
    prompt = "hello world, how are you the movie was great"
    chosen = " the film was bad hello world"
    p_ids, c_ids = ids(tok, prompt), ids(tok, chosen)
    assert len(p_ids) > 4 and len(c_ids) > 3
    pairs = [PreferencePair(prompt, chosen, " great", 0), PreferencePair("the", " a", " b", 1)]
    out, report = tokenize_pairs(pairs, tok, TruncationConfig(max_prompt_length=4, max_completion_length=3))
    assert out[0].prompt_ids == p_ids[-4:]
    assert out[0].chosen_ids == c_ids[:3]  # truncated completion loses its eos
    assert out[0].rejected_ids == ids(tok, " great") + [EOS]
    assert out[1].chosen_ids == ids(tok, " a") + [EOS]
    assert report.truncated == {"prompt": 1, "chosen": 1}
    assert report.num_skipped == 0
    assert "truncated 1 (prompt)" in report.summary()


def test_truncate_keeps_bos_in_front(bos_tok):
    prompt = "hello world, how are you the movie was great"
    out, _ = tokenize_pairs(
        [PreferencePair(prompt, " a", " b", 0)], bos_tok, TruncationConfig(max_prompt_length=4)
    )
    assert out[0].prompt_ids == [BOS] + ids(bos_tok, prompt)[-3:]


def test_eos_counts_toward_completion_limit(tok):
    c = ids(tok, " was great")
    trunc = TruncationConfig(max_completion_length=len(c) + 1)
    (tp,), report = tokenize_pairs([PreferencePair("the", " was great", " bad", 0)], tok, trunc)
    assert tp.chosen_ids == c + [EOS] and report.truncated == {}
    (tp,), report = tokenize_pairs(
        [PreferencePair("the", " was great", " bad", 0)], tok, TruncationConfig(max_completion_length=len(c))
    )
    assert tp.chosen_ids == c and report.truncated == {"chosen": 1}


def test_drop_policy(tok):
    long_prompt = "hello world, how are you the movie was great"
    pairs = [
        PreferencePair(long_prompt, " a", " b", 0),
        PreferencePair("the", " the film was bad hello world", " b", 1),
        PreferencePair("the", " a", " b", 2),
    ]
    out, report = tokenize_pairs(
        pairs, tok, TruncationConfig(max_prompt_length=4, max_completion_length=3, policy="drop")
    )
    assert [t.index for t in out] == [2]
    assert report.examples == {
        "prompt longer than max_prompt_length=4": [0],
        "chosen longer than max_completion_length=3 (eos included)": [1],
    }
    assert report.truncated == {}


def test_invalid_policy_lists_valid():
    with pytest.raises(ValueError) as e:
        TruncationConfig(policy="cut")
    assert "truncate" in str(e.value) and "drop" in str(e.value)
    with pytest.raises(ValueError):
        TruncationConfig(max_prompt_length=0)


def test_empty_completion_and_prompt_skipped(tok):
    pairs = [
        PreferencePair("the", "", " b", 0),  # empty chosen
        PreferencePair("", " a", " b", 1),  # empty prompt, no bos to condition on
        PreferencePair("the", " a", " b", 2),
    ]
    out, report = tokenize_pairs(pairs, tok, TruncationConfig())
    assert [t.index for t in out] == [2]
    assert report.examples["chosen is empty after tokenisation"] == [0]
    assert report.examples["empty prompt: no token to condition the first completion token on"] == [1]


def test_identical_after_truncation_skipped(tok):
    pairs = [
        PreferencePair("the", " the film was bad", " the film was great", 0),
        PreferencePair("the", " a", " b", 1),
    ]
    out, report = tokenize_pairs(pairs, tok, TruncationConfig(max_completion_length=2))
    assert [t.index for t in out] == [1]
    assert report.examples == {"chosen identical to rejected after tokenisation/truncation": [0]}


def test_all_skipped_raises(tok):
    with pytest.raises(DataError, match="every row"):
        tokenize_pairs([PreferencePair("", " a", " b", 0)], tok, TruncationConfig(), source="prefs.jsonl")


def test_pad_must_differ_from_eos():
    t = make_tokenizer()
    t.pad_token = t.eos_token
    with pytest.raises(ValueError, match="distinguishable from EOS"):
        tokenize_pairs([PreferencePair("the", " a", " b", 0)], t, TruncationConfig())
    t.pad_token = None
    with pytest.raises(ValueError, match="pad_token_id"):
        tokenize_pairs([PreferencePair("the", " a", " b", 0)], t, TruncationConfig())


def test_tokenize_unpaired(tok):
    examples = [
        UnpairedExample("the movie", " was great", True, 3),
        UnpairedExample("hello world, how are you the movie was great", " a", False, 5),
        UnpairedExample("the", "", True, 6),
    ]
    out, report = tokenize_unpaired(examples, tok, TruncationConfig(max_prompt_length=4))
    assert out == [
        TokenizedUnpaired(ids(tok, "the movie"), ids(tok, " was great") + [EOS], True, 3),
        TokenizedUnpaired(
            ids(tok, "hello world, how are you the movie was great")[-4:], ids(tok, " a") + [EOS], False, 5
        ),
    ]
    assert report.truncated == {"prompt": 1}
    assert report.examples == {"completion is empty after tokenisation": [6]}


# ------------------------------------------------------------------------------------------- collate


def test_collate_sequences_layout():
    b = collate_sequences([[5, 6, 7], [8]], [[9, EOS], [10, 11, 12, EOS]], pad_id=PAD)
    assert b.prompt_width == 3 and b.completion_width == 4
    assert b.input_ids.tolist() == [[5, 6, 7, 9, EOS, PAD, PAD], [PAD, PAD, 8, 10, 11, 12, EOS]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert b.completion_mask.dtype == torch.float32
    assert b.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b.completion_ids.tolist() == [[9, EOS, PAD, PAD], [10, 11, 12, EOS]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 4], [0, 0, 0, 1, 2, 3, 4]]
    assert b.completion_lengths.tolist() == [2.0, 4.0]
    assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.long


def test_collate_sequences_mask_not_from_pad_id():
    # a real token equal to pad_id must still be attended (masks come from lengths)
    b = collate_sequences([[PAD, 5]], [[PAD, EOS]], pad_id=PAD)
    assert b.attention_mask.tolist() == [[1, 1, 1, 1]] and b.completion_mask.tolist() == [[1, 1]]


def test_collate_pairs_order_and_reference():
    items = [
        TokenizedPair([5, 6], [7, EOS], [8, 9, EOS], index=4),
        TokenizedPair([10], [11, 12, 13, EOS], [14, EOS], index=1),
    ]
    table = torch.tensor([[0.0, 0.5], [1.0, 1.5], [2.0, 2.5], [3.0, 3.5], [4.0, 4.5]])
    batch = collate_pairs(items, PAD, reference_logps=table)
    s = batch.sequences
    assert batch.num_pairs == 2 and len(s) == 4
    assert batch.indices.tolist() == [4, 1]
    assert s.input_ids.tolist() == [
        [5, 6, 7, EOS, PAD, PAD],  # chosen 0
        [PAD, 10, 11, 12, 13, EOS],  # chosen 1
        [5, 6, 8, 9, EOS, PAD],  # rejected 0
        [PAD, 10, 14, EOS, PAD, PAD],  # rejected 1
    ]
    assert s.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch.reference_logps.tolist() == [4.0, 1.0, 4.5, 1.5]
    assert collate_pairs(items, PAD).reference_logps is None


def test_collate_pairs_reference_errors():
    items = [TokenizedPair([5], [7, EOS], [8, EOS], index=3)]
    with pytest.raises(ValueError, match="N_dataset, 2"):
        collate_pairs(items, PAD, reference_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="rebuild"):
        collate_pairs(items, PAD, reference_logps=torch.zeros(2, 2))


def test_collate_unpaired_kl_mismatch():
    items = [
        TokenizedUnpaired([5], [6, EOS], True, 10),
        TokenizedUnpaired([7, 8], [9, 9, EOS], False, 11),
        TokenizedUnpaired([12], [13, EOS], True, 12),
    ]
    batch = collate_unpaired(items, PAD, reference_logps=torch.arange(13, dtype=torch.float32))
    assert batch.labels.dtype == torch.bool and batch.labels.tolist() == [True, False, True]
    assert batch.indices.tolist() == [10, 11, 12]
    assert batch.reference_logps.tolist() == [10.0, 11.0, 12.0]
    assert batch.sequences.input_ids.tolist() == [
        [PAD, 5, 6, EOS, PAD],
        [7, 8, 9, 9, EOS],
        [PAD, 12, 13, EOS, PAD],
    ]
    # prompt i with completion (i + 1) mod B
    assert batch.kl_sequences.input_ids.tolist() == [
        [PAD, 5, 9, 9, EOS],
        [7, 8, 13, EOS, PAD],
        [PAD, 12, 6, EOS, PAD],
    ]
    assert batch.kl_sequences.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]


def test_collate_unpaired_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        collate_unpaired([TokenizedUnpaired([5], [6, EOS], True, 0)], PAD)


def test_batches_iterator():
    items = list(range(10))
    assert list(batches(items, 4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(batches(items, 4, shuffle=False, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a = list(batches(items, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    b = list(batches(items, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    c = list(batches(items, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert a == b and a != c
    assert sorted(x for chunk in a for x in chunk) == items
    with pytest.raises(ValueError):
        list(batches(items, 0, shuffle=False))


def test_end_to_end_jsonl_to_batch(tmp_path, tok):
    rows = [
        {"prompt": "the movie", "chosen": " was great", "rejected": " was bad"},
        {"prompt": "the film", "chosen": None, "rejected": " x"},
        {"prompt": "hello world", "chosen": " how are you", "rejected": " the film was bad"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, parse_report = load_preference_pairs(str(path))
    items, _ = tokenize_pairs(pairs, tok, TruncationConfig())
    batch = collate_pairs(items, tok.pad_token_id)
    assert parse_report.examples == {"missing or null 'chosen'": [1]}
    assert batch.indices.tolist() == [0, 2]
    s = batch.sequences
    texts = [rows[0]["chosen"], rows[2]["chosen"], rows[0]["rejected"], rows[2]["rejected"]]
    for i, text in enumerate(texts):
        comp = s.completion_ids[i][s.completion_mask[i].bool()].tolist()
        assert comp[-1] == EOS and tok.decode(comp[:-1]) == text
        prompt = s.input_ids[i, : s.prompt_width][s.attention_mask[i, : s.prompt_width].bool()].tolist()
        assert tok.decode(prompt) == rows[[0, 2][i % 2]]["prompt"]
