"""The study entry point: samples written by evaluation → judgements.csv (oracle + OpenAI-compatible judge through
the local fake server) → judge columns on the points table; the API key never lands anywhere; the cache is safe
under concurrent writers; the oracle's Bradley–Terry noise behaves."""
from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pandas as pd
import pytest

from rlhf_lab.config import EvalConfig
from rlhf_lab.eval.policy_eval import evaluate_policy
from rlhf_lab.eval.samples import read_samples, sample_steps, write_samples
from rlhf_lab.judges.base import Comparison, Verdict
from rlhf_lab.judges.cache import VerdictCache, verdict_key
from rlhf_lab.judges.config import OracleJudgeConfig
from rlhf_lab.judges.oracle import OracleJudge
from rlhf_lab.judges.study import JUDGEMENT_COLUMNS, judge_study, merge_judgements
from rlhf_lab.rewards.gold import VaderReward
from rlhf_lab.utils.errors import DataError
from tests.fake_openai_server import FakeOpenAIServer

KEY = "sk-test-STUDY-1a2b3c4d5e6f"
ENV = "RLHF_LAB_TEST_STUDY_KEY"


def records(step: int, n: int, policy_good: int) -> list[dict]:
    """n samples; after step 0 the first `policy_good` completions are "good ..." (gold 0.9), the rest "bad ..." (0.1);
    at step 0 all are "meh ..." (gold 0.2)."""
    out = []
    for i in range(n):
        good = step > 0 and i < policy_good
        text = f"good movie {i}" if good else (f"bad movie {i}" if step > 0 else f"meh movie {i}")
        gold = 0.9 if good else (0.1 if step > 0 else 0.2 + i / 1000)
        out.append({"index": i, "prompt": f"review {i}", "completion": text, "gold": gold,
                    "length": len(text.split()) + (3 if good else 0), "temperature": 1.0})
    return out


def make_study(root, n=8):
    for run, good in (("dpo-beta0.1-seed0", 6), ("ppo-kl0.05-seed0", 2)):
        for step in (0, 50, 100):
            write_samples(root / "runs" / run, step, records(step, n, good))
    (root / "runs" / "unevaluated").mkdir(parents=True)
    return root


def judges(server):
    return [{"name": "oracle", "kind": "oracle"},
            {"name": "fake", "kind": "openai", "model": "fake-gpt", "base_url": server.base_url, "api_key_env": ENV,
             "timeout": 5.0, "backoff_base": 0.01, "backoff_max": 0.05, "price_per_1k_prompt": 0.5,
             "price_per_1k_completion": 1.0}]


def test_judge_study_writes_judgements_and_merges_onto_points(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ENV, KEY)
    caplog.set_level(logging.DEBUG)  # every logger, the openai/httpx ones included
    study = make_study(tmp_path / "study")
    with FakeOpenAIServer(KEY) as server:
        table = judge_study(study, judges(server), tmp_path / "cache" / "verdicts.sqlite", n_boot=500)
        first_requests = server.requests
        again = judge_study(study, judges(server), tmp_path / "cache" / "verdicts.sqlite", n_boot=500)
        assert server.requests == first_requests           # the rerun asked the server nothing
    assert f"Bearer {KEY}" in server.seen_auth               # the key really was used ...
    on_disk = pd.read_csv(study / "judgements.csv")
    assert list(on_disk.columns) == JUDGEMENT_COLUMNS and len(on_disk) == 4
    rows = table.set_index(["run_id", "judge"])
    dpo, ppo = rows.loc[("dpo-beta0.1-seed0", "oracle")], rows.loc[("ppo-kl0.05-seed0", "oracle")]
    assert (dpo.n, dpo.wins, dpo.losses, dpo.ties) == (8, 6, 2, 0) and dpo.win_rate == pytest.approx(0.75)
    assert ppo.win_rate == pytest.approx(0.25) and dpo.step == 100 and dpo.temperature == 1.0
    fake = rows.loc[("dpo-beta0.1-seed0", "fake")]
    # the fake judge prefers "good ..." in both orders and picks A when neither is: 6 wins, 2 position-tied pairs
    assert (fake.wins, fake.losses, fake.ties, fake.invalid) == (6, 0, 2, 0)
    assert fake.position_bias_rate == pytest.approx(2 / 8)
    assert fake.agreement_with_oracle == pytest.approx((6 + 0.5 * 2) / 8)
    assert fake.requests == 16 and fake.tokens > 0 and fake.cost_usd > 0
    assert fake.win_rate_ci_low <= fake.win_rate <= fake.win_rate_ci_high
    assert again["requests"].sum() == 0 and (again["cached"] == 16).all()
    agree = pd.read_csv(study / "judge_agreement.csv")
    assert set(agree.run_id) == {"dpo-beta0.1-seed0", "ppo-kl0.05-seed0"}

    points = pd.DataFrame([{"run_id": r, "step": s, "gold_reward_mean": 0.5}
                           for r in ("dpo-beta0.1-seed0", "ppo-kl0.05-seed0") for s in (0, 50, 100)])
    merged = merge_judgements(points, table)
    final = merged[(merged.run_id == "dpo-beta0.1-seed0") & (merged.step == 100)].iloc[0]
    assert final.judge_oracle_win_rate == pytest.approx(0.75) and not math.isnan(final.judge_fake_ci_low)
    assert merged[merged.step < 100].judge_oracle_win_rate.isna().all() and len(merged) == len(points)

    # the API key never reaches logs, the cache, or any file the study wrote
    assert KEY not in caplog.text
    for path in list(study.rglob("*")) + list((tmp_path / "cache").rglob("*")):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_bad_samples_files_name_the_file_and_line(tmp_path):
    run = tmp_path / "runs" / "r"
    write_samples(run, 0, records(0, 2, 0))
    path = write_samples(run, 10, records(10, 2, 1))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"step_000010\.jsonl:3"):
        judge_study(tmp_path, [{"name": "oracle", "kind": "oracle"}], tmp_path / "v.sqlite")
    path.write_text('{"index": 0, "prompt": "other prompt", "completion": "x", "length": 1}\n')
    with pytest.raises(DataError, match="different prompt"):
        judge_study(tmp_path, [{"name": "oracle", "kind": "oracle"}], tmp_path / "v.sqlite")


def test_evaluate_policy_returns_records_that_match_its_metrics(tiny_model, tiny_tokenizer, tmp_path):
    prompts = [tiny_tokenizer.encode(t)[:3] for t in ("this movie", "the worst", "a fine cast")]
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=6, batch_size=4, temperature=1.0)
    result = evaluate_policy(tiny_model, tiny_model, tiny_tokenizer, prompts, VaderReward(), cfg)
    assert len(result.records) == result.samples == 6 and "eval/records" not in result.as_metrics()
    assert np.mean([r["gold"] for r in result.records]) == pytest.approx(result.gold_reward_mean)
    assert np.mean([r["length"] for r in result.records]) == pytest.approx(result.response_len_mean)
    assert [r["index"] for r in result.records] == list(range(6))
    write_samples(tmp_path, 0, result.records)
    assert sample_steps(tmp_path) == [0] and read_samples(tmp_path / "samples" / "step_000000.jsonl") == result.records


def test_cache_is_safe_under_concurrent_writers(tmp_path):
    path = tmp_path / "v.sqlite"
    errors = []

    def writer(t: int) -> None:
        try:
            cache = VerdictCache(path)
            for i in range(50):
                item = Comparison(f"p{i}", f"a{t}", "b")
                cache.put(verdict_key("j", "t", item), "j", "t", "ab", Verdict("A", "r", "raw"))
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and VerdictCache(path).count() == 200
    transient = Verdict("invalid", error="transport: timeouts")
    VerdictCache(path).put("k", "j", "t", "ab", transient)
    assert VerdictCache(path).get_many(["k"]) == {}


def test_oracle_bradley_terry_noise_matches_its_probability_and_is_order_independent():
    scores = {f"c{i}": float(i) / 100 for i in range(200)}
    scorer = lambda prompts, completions: np.array([scores[c] for c in completions])
    noiseless = OracleJudge(scorer, OracleJudgeConfig())
    assert [v.winner for v in noiseless.judge_many([Comparison("p", "c5", "c3"), Comparison("p", "c3", "c5"),
                                                    Comparison("p", "c4", "c4")])] == ["A", "B", "tie"]
    # r_A - r_B = 0.1 at T = 0.1: P(A) = sigmoid(1) = 0.731
    noisy = OracleJudge(scorer, OracleJudgeConfig(noise_temperature=0.1, seed=7))
    items = [Comparison(f"p{i}", f"c{i % 190 + 10}", f"c{i % 190}") for i in range(4000)]
    winners = [v.winner for v in noisy.judge_many(items)]
    assert np.mean([w == "A" for w in winners]) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.025)
    assert [v.winner for v in noisy.judge_many(items[::-1])] == winners[::-1]
