"""Gold (oracle) reward functions for the controlled-sentiment task, behind one interface.

A gold reward scores *full texts* (prompt + completion) with a number in [0, 1], higher meaning more positive
sentiment. It stands in for the human labeller of the DPO paper (§6.1, which used a RoBERTa sentiment
classifier's p(positive)): it labels preference pairs and measures the policies at evaluation time. No policy
ever trains on it directly (except the PPO-GT arm, which is the point of that arm).

Two implementations:

* `SentimentClassifierReward` — TF-IDF (word 1–2 grams, sublinear tf, min_df) + logistic regression trained on
  the IMDb train labels; reward = p(positive). ≈0.91 held-out accuracy on the full train split.
* `VaderReward` — the rule-based VADER compound score c ∈ [-1, 1] mapped to (c + 1) / 2. Needs no training.

`make_gold_reward(name, ...)` builds either by name.

Security note: `SentimentClassifierReward.load` unpickles a file (via joblib), and unpickling runs code. Only
load directories this library wrote itself (its own content-addressed cache), never one from elsewhere.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GOLD_REWARD_NAMES = ("classifier", "vader")

# Hyper-parameters of the classifier. They are part of the gold cache key (see `classifier_cache_key`), so
# changing one here retrains instead of silently reusing an old model.
CLASSIFIER_HPARAMS: dict[str, Any] = {
    "ngram_range": [1, 2],  # word unigrams and bigrams
    "sublinear_tf": True,   # 1 + log(tf): long reviews don't dominate
    "min_df": 2,            # drop n-grams seen in a single review (mostly noise, and halves the vocabulary)
    "C": 10.0,              # inverse L2 strength; 4–30 all give ≈0.91 on the full split
    "solver": "liblinear",
    "max_iter": 1000,
}
_CLASSIFIER_FORMAT = 1
_MODEL_FILE = "model.joblib"
_META_FILE = "gold_meta.json"

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_text(text: str) -> str:
    """The normalisation applied to IMDb reviews: `<br />` tags → space, whitespace runs collapsed, stripped."""
    return " ".join(_BR.sub(" ", text).split())


class GoldReward(ABC):
    """Oracle sentiment reward: `score(texts)` → float64 array of shape (N,), values in [0, 1]."""

    name: str = "gold"

    @abstractmethod
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Score full texts (prompt + completion); higher = more positive sentiment."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.score(texts)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Fraction of texts where `score > 0.5` agrees with the 0/1 sentiment label."""
        labels = np.asarray(labels)
        if len(labels) == 0:
            raise ValueError("accuracy() needs at least one labelled text")
        return float(np.mean((self.score(texts) > 0.5).astype(int) == labels))


def _as_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("score() takes a list of texts, not a single string")
    return [clean_text(t) for t in texts]


class SentimentClassifierReward(GoldReward):
    """TF-IDF + logistic regression sentiment classifier; reward = p(positive)."""

    name = "classifier"

    def __init__(self, pipeline: Any = None, hparams: dict[str, Any] | None = None):
        self.hparams = dict(CLASSIFIER_HPARAMS if hparams is None else hparams)
        self.pipeline = pipeline
        self.meta: dict[str, Any] = {}

    @property
    def is_trained(self) -> bool:
        return self.pipeline is not None

    def train(self, texts: Sequence[str], labels: Sequence[int], seed: int = 0) -> SentimentClassifierReward:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline

        labels = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(labels):
            raise ValueError(f"train(): {len(texts)} texts but {len(labels)} labels")
        if set(np.unique(labels).tolist()) != {0, 1}:
            raise ValueError("train(): labels must be 0 (negative) and 1 (positive), both present")
        h = self.hparams
        vectorizer = TfidfVectorizer(
            ngram_range=tuple(h["ngram_range"]), sublinear_tf=h["sublinear_tf"], min_df=h["min_df"],
            dtype=np.float32,
        )
        clf = LogisticRegression(C=h["C"], solver=h["solver"], max_iter=h["max_iter"], random_state=seed)
        pipeline = Pipeline([("tfidf", vectorizer), ("logreg", clf)])
        pipeline.fit(_as_list(texts), labels)
        # The vectorizer keeps every pruned n-gram in `stop_words_` (millions of strings): only needed for
        # introspection, so drop it before pickling (sklearn's own advice).
        vectorizer.stop_words_ = None
        self.pipeline = pipeline
        self.meta = {"num_train": len(labels), "seed": int(seed), "hparams": h,
                     "num_features": len(vectorizer.vocabulary_)}
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if self.pipeline is None:
            raise RuntimeError("SentimentClassifierReward is not trained: call train() or load() first")
        texts = _as_list(texts)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        classes = list(self.pipeline.classes_)
        proba = self.pipeline.predict_proba(texts)[:, classes.index(1)]
        return np.clip(proba.astype(np.float64), 0.0, 1.0)

    def save(self, directory: Path) -> None:
        """Write `model.joblib` and `gold_meta.json` into `directory` (created if needed)."""
        import joblib

        if self.pipeline is None:
            raise RuntimeError("nothing to save: the classifier is not trained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.pipeline, directory / _MODEL_FILE)
        import sklearn

        meta = dict(self.meta, name=self.name, format=_CLASSIFIER_FORMAT, sklearn=sklearn.__version__)
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> SentimentClassifierReward:
        """Load a classifier saved by `save`. This unpickles, i.e. runs code: only load our own cache."""
        import joblib

        directory = Path(directory)
        model_file = directory / _MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"no gold classifier at {model_file}")
        meta_file = directory / _META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        obj = cls(pipeline=joblib.load(model_file), hparams=meta.get("hparams"))
        obj.meta = meta
        return obj


class VaderReward(GoldReward):
    """VADER compound sentiment c ∈ [-1, 1] mapped to (c + 1) / 2 ∈ [0, 1]. Rule-based: nothing to train."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> np.ndarray:
        compound = np.array([self._analyzer.polarity_scores(t)["compound"] for t in _as_list(texts)],
                            dtype=np.float64)
        return np.clip((compound + 1.0) / 2.0, 0.0, 1.0)


def _major_minor(dist: str) -> str:
    import importlib.metadata

    try:
        return ".".join(importlib.metadata.version(dist).split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def read_classifier_meta(directory: Path) -> dict[str, Any]:
    """The `gold_meta.json` written by `SentimentClassifierReward.save` (no unpickling)."""
    return json.loads((Path(directory) / _META_FILE).read_text())


def classifier_cache_key(split_key: dict[str, Any], seed: int) -> dict[str, Any]:
    """Everything that determines a trained classifier: the training data (its split), seed, hparams, versions.

    (The sklearn version is read from package metadata: importing sklearn costs seconds, a cache hit should not.)
    """
    return {
        "kind": "gold-classifier",
        "format": _CLASSIFIER_FORMAT,
        "split": split_key,
        "seed": int(seed),
        "hparams": CLASSIFIER_HPARAMS,
        "sklearn": _major_minor("scikit-learn"),
    }


def make_gold_reward(
    name: str,
    *,
    path: Path | None = None,
    train_texts: Sequence[str] | None = None,
    train_labels: Sequence[int] | None = None,
    seed: int = 0,
) -> GoldReward:
    """Build a gold reward by name.

    - "vader": no arguments needed.
    - "classifier": either `path` (a directory written by `SentimentClassifierReward.save`) or
      `train_texts` + `train_labels` to train a fresh one.
    """
    if name == "vader":
        return VaderReward()
    if name == "classifier":
        if path is not None:
            return SentimentClassifierReward.load(path)
        if train_texts is not None and train_labels is not None:
            return SentimentClassifierReward().train(train_texts, train_labels, seed=seed)
        raise ValueError("gold reward 'classifier' needs either path= (a saved classifier) "
                         "or train_texts= and train_labels=")
    raise ValueError(f"unknown gold reward {name!r}; valid names: {', '.join(GOLD_REWARD_NAMES)}")
