"""Gold rewards: the TF-IDF + logistic-regression classifier, VADER, and the factory."""
from __future__ import annotations

import numpy as np
import pytest

from rlhf_lab.data.tasks.imdb import load_imdb_reviews
from rlhf_lab.rewards.gold import (
    GOLD_REWARD_NAMES,
    GoldReward,
    SentimentClassifierReward,
    VaderReward,
    make_gold_reward,
)

POSITIVE = "This movie was wonderful. Brilliant acting, a beautiful story, I loved every minute of it. A masterpiece."
NEGATIVE = "This movie was terrible. Awful acting, a boring story, I hated every minute of it. A waste of time."


@pytest.fixture(scope="module")
def small_data():
    """2,000 training and 1,000 held-out IMDb reviews (disjoint, seeded)."""
    df = load_imdb_reviews()
    idx = np.random.default_rng(0).permutation(len(df))
    texts, labels = df["text"].tolist(), df["label"].tolist()
    tr, te = idx[:2000], idx[2000:3000]
    return ([texts[i] for i in tr], [labels[i] for i in tr], [texts[i] for i in te], [labels[i] for i in te])


@pytest.fixture(scope="module")
def classifier(small_data):
    train_texts, train_labels, _, _ = small_data
    return SentimentClassifierReward().train(train_texts, train_labels, seed=0)


def _check_scores(scores: np.ndarray, n: int) -> None:
    assert isinstance(scores, np.ndarray)
    assert scores.dtype == np.float64
    assert scores.shape == (n,)
    assert np.all((scores >= 0.0) & (scores <= 1.0))


def test_classifier_accuracy_and_scores(classifier, small_data):
    _, _, test_texts, test_labels = small_data
    assert isinstance(classifier, GoldReward)
    assert classifier.name == "classifier"
    acc = classifier.accuracy(test_texts, test_labels)
    assert acc > 0.75, acc
    scores = classifier.score(test_texts[:50])
    _check_scores(scores, 50)
    pos, neg = classifier.score([POSITIVE, NEGATIVE])
    assert pos > 0.5 > neg
    assert classifier.meta["num_train"] == 2000 and classifier.meta["num_features"] > 1000


def test_classifier_edge_inputs(classifier):
    _check_scores(classifier.score([]), 0)
    _check_scores(classifier.score(["", "   "]), 2)
    # Callable alias, and the same normalisation as the training data (<br /> → space).
    np.testing.assert_allclose(classifier(["great<br /><br />film"]), classifier.score(["great film"]))
    with pytest.raises(TypeError):
        classifier.score(POSITIVE)  # a bare string, not a list


def test_classifier_save_load_roundtrip(classifier, small_data, tmp_path):
    texts = small_data[2][:20] + [POSITIVE, NEGATIVE]
    classifier.save(tmp_path / "gold")
    loaded = SentimentClassifierReward.load(tmp_path / "gold")
    np.testing.assert_array_equal(loaded.score(texts), classifier.score(texts))
    assert loaded.meta["hparams"] == classifier.hparams
    via_factory = make_gold_reward("classifier", path=tmp_path / "gold")
    np.testing.assert_array_equal(via_factory.score(texts), classifier.score(texts))
    # The pruned-vocabulary set is dropped before pickling (it would dominate the file size).
    assert loaded.pipeline.named_steps["tfidf"].stop_words_ is None


def test_classifier_errors(tmp_path):
    with pytest.raises(RuntimeError, match="not trained"):
        SentimentClassifierReward().score(["x"])
    with pytest.raises(FileNotFoundError):
        SentimentClassifierReward.load(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="labels"):
        SentimentClassifierReward().train(["a good film", "a bad film"], [1])
    with pytest.raises(ValueError, match="both present"):
        SentimentClassifierReward().train(["a good film", "a fine film"], [1, 1])


def test_vader(small_data):
    vader = VaderReward()
    assert isinstance(vader, GoldReward) and vader.name == "vader"
    pos, neg = vader.score([POSITIVE, NEGATIVE])
    assert pos > 0.5 > neg
    assert vader.score([""])[0] == 0.5  # compound 0 → neutral
    _, _, test_texts, test_labels = small_data
    _check_scores(vader.score(test_texts[:300]), 300)
    assert vader.accuracy(test_texts[:300], test_labels[:300]) > 0.6  # VADER is a weaker judge (~0.7 on IMDb)


def test_factory():
    assert isinstance(make_gold_reward("vader"), VaderReward)
    with pytest.raises(ValueError, match="path="):
        make_gold_reward("classifier")
    with pytest.raises(ValueError) as info:
        make_gold_reward("roberta")
    message = str(info.value)
    assert "roberta" in message and all(name in message for name in GOLD_REWARD_NAMES)


def test_factory_trains_classifier():
    texts = [POSITIVE, NEGATIVE] * 5
    clf = make_gold_reward("classifier", train_texts=texts, train_labels=[1, 0] * 5, seed=0)
    assert isinstance(clf, SentimentClassifierReward)
    pos, neg = clf.score([POSITIVE, NEGATIVE])
    assert pos > neg
