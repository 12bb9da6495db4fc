"""The OpenAI-compatible judge through the REAL `openai` client against a local server (tests/fake_openai_server.py)
that injects 429s, 500s, 503s, timeouts, non-JSON bodies and answers with no verdict."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_lab.judges.base import WINNERS
from rlhf_lab.judges.cache import VerdictCache
from rlhf_lab.judges.config import OpenAIJudgeConfig
from rlhf_lab.judges.evaluate import judge_pairs
from rlhf_lab.judges.openai_judge import (
    JudgeAuthError,
    OpenAIJudge,
    backoff_delay,
    public_url,
    resolve_api_key,
)
from rlhf_lab.judges.templates import TEMPLATES
from rlhf_lab.utils.errors import ConfigError
from tests.fake_openai_server import FakeOpenAIServer

KEY = "sk-test-FAKE-9f8e7d6c5b4a"
ENV = "RLHF_LAB_TEST_JUDGE_KEY"


def judge_for(server: FakeOpenAIServer, **over) -> OpenAIJudge:
    settings = dict(name="fake", model="fake-gpt", base_url=server.base_url, api_key_env=ENV, timeout=0.5,
                    concurrency=4, max_retries=4, backoff_base=0.01, backoff_max=0.05, price_per_1k_prompt=1.0,
                    price_per_1k_completion=2.0)
    cfg = OpenAIJudgeConfig(**{**settings, **over})
    return OpenAIJudge(cfg, TEMPLATES["sentiment"])


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FakeOpenAIServer(KEY, slow_s=1.5) as s:
        yield s


def pairs(markers):
    prompts = [f"review {i} {m}" for i, m in enumerate(markers)]
    policy = [f"good film {i}" for i in range(len(markers))]
    baseline = [f"bad film {i}" for i in range(len(markers))]
    return prompts, policy, baseline


def test_every_comparison_ends_judged_or_invalid_and_a_rerun_makes_zero_requests(server, tmp_path):
    markers = ["", "RATE", "FAIL", "SLOW", "JUNK", "JUNK1", "NOJSON", "", "RATE", ""]
    prompts, policy, baseline = pairs(markers)
    judge = judge_for(server)
    cache = VerdictCache(tmp_path / "verdicts.sqlite")
    judged = judge_pairs(judge, prompts, policy, baseline, cache, both_orders=True)
    assert len(judged.verdicts) == 2 * len(markers)          # none lost
    assert all(v.winner in WINNERS for v in judged.verdicts)
    invalid = [i for i, v in enumerate(judged.verdicts) if v.winner == "invalid"]
    assert sorted(i % len(markers) for i in invalid) == [4, 4]  # only JUNK, in both orders: malformed
    assert {judged.verdicts[i].error for i in invalid} == {"malformed"}
    # the policy ("good ...") wins every readable pair in both orders: no position bias, win rate 1
    assert judged.outcomes[[0, 1, 2, 3, 5, 6, 7, 8, 9]].tolist() == [1.0] * 9
    # the counts at the server match the judge's own accounting, retries included
    assert server.requests == judge.stats["requests"] == judged.usage.requests
    assert server.by_marker["RATE"] == 2 * 2 * 3              # 2 pairs x 2 orders x (2 refusals + 1 answer)
    assert server.by_marker["JUNK"] == 2 * 2                  # asked once more, then invalid
    assert judge.stats["rate_limited"] == 8 and judge.stats["server_errors"] == 2
    assert judge.stats["timeouts"] == 2 and judge.stats["malformed_body"] == 2
    assert judged.usage.tokens > 0
    assert judge.usage_cost_usd(judged.usage) == pytest.approx(
        (judged.usage.prompt_tokens * 1.0 + judged.usage.completion_tokens * 2.0) / 1000)

    before = server.requests
    again = judge_pairs(judge_for(server), prompts, policy, baseline, cache, both_orders=True)
    assert server.requests == before                          # zero requests the second time
    assert again.cached == 2 * len(markers) and again.usage.requests == 0
    assert [v.winner for v in again.verdicts] == [v.winner for v in judged.verdicts]


def test_a_server_that_stays_down_gives_invalid_verdicts_that_a_rerun_retries(server, tmp_path):
    prompts, policy, baseline = pairs(["DOWN", ""])
    cache = VerdictCache(tmp_path / "v.sqlite")
    judged = judge_pairs(judge_for(server, max_retries=2), prompts, policy, baseline, cache, both_orders=False)
    assert judged.verdicts[0].winner == "invalid" and judged.verdicts[0].error == "transport: server_errors"
    assert judged.verdicts[1].winner == "A"
    assert server.by_marker["DOWN"] == 3                     # 1 + 2 retries
    assert cache.count() == 1                                # the transport failure was not cached
    server.healed = True
    rerun = judge_pairs(judge_for(server), prompts, policy, baseline, cache, both_orders=False)
    assert [v.winner for v in rerun.verdicts] == ["A", "A"] and rerun.usage.requests == 1


def test_a_rejected_key_stops_with_a_message_naming_the_variable(server, monkeypatch):
    monkeypatch.setenv(ENV, "sk-wrong")
    with pytest.raises(JudgeAuthError, match=ENV) as err:
        judge_for(server).judge("p", "good", "bad")
    assert "sk-wrong" not in str(err.value)


def test_api_key_only_from_env_or_secrets_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    cfg = OpenAIJudgeConfig(api_key_env=ENV)
    with pytest.raises(ConfigError, match=ENV):
        resolve_api_key(cfg)
    secret = tmp_path / "key.txt"
    secret.write_text(KEY + "\n")
    secret.chmod(0o600)
    assert resolve_api_key(OpenAIJudgeConfig(api_key_env=ENV, api_key_file=str(secret))) == KEY
    monkeypatch.setenv(ENV, "from-env")
    assert resolve_api_key(OpenAIJudgeConfig(api_key_env=ENV, api_key_file=str(secret))) == "from-env"
    assert resolve_api_key(OpenAIJudgeConfig(api_key_env="UNSET_VAR_X", api_key_required=False)) == "no-key-required"


def test_identity_drops_credentials_and_backoff_is_bounded():
    assert public_url("http://user:pw@host:8000/v1?token=x") == "http://host:8000/v1"
    import random

    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 8.0, None, rng) for a in range(10)]
    assert all(0 <= d <= 8.0 for d in delays) and max(delays[:2]) <= 2.0
    assert backoff_delay(0, 1.0, 8.0, 5.0, rng) >= 5.0           # Retry-After honoured
    assert backoff_delay(0, 1.0, 8.0, 500.0, rng) == 8.0          # but capped


_RESUME_SCRIPT = """
import sys
from rlhf_lab.judges.cache import VerdictCache
from rlhf_lab.judges.config import OpenAIJudgeConfig
from rlhf_lab.judges.evaluate import judge_pairs
from rlhf_lab.judges.openai_judge import OpenAIJudge
from rlhf_lab.judges.templates import TEMPLATES
url, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = OpenAIJudgeConfig(model="m", base_url=url, api_key_env="%s", concurrency=1, timeout=5)
judge = OpenAIJudge(cfg, TEMPLATES["sentiment"])
judge_pairs(judge, [f"p{i} SLOW" for i in range(n)], [f"good {i}" for i in range(n)], [f"bad {i}" for i in range(n)],
            VerdictCache(db), both_orders=False)
""" % ENV


def test_an_interrupted_evaluation_resumes_without_repeating_stored_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    n = 12
    with FakeOpenAIServer(KEY, slow_s=0.15) as server:  # every first attempt takes 0.15 s: time to kill mid-way
        db = tmp_path / "v.sqlite"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen([sys.executable, "-c", _RESUME_SCRIPT, server.base_url, str(db), str(n)], env=env)
        try:
            deadline = time.time() + 60
            while time.time() < deadline and (not db.exists() or VerdictCache(db).count() < 3):
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        stored = VerdictCache(db).count()
        assert 3 <= stored < n
        before = server.requests
        cfg_judge = OpenAIJudge(OpenAIJudgeConfig(model="m", base_url=server.base_url, api_key_env=ENV,
                                                  concurrency=1, timeout=5), TEMPLATES["sentiment"])
        prompts = [f"p{i} SLOW" for i in range(n)]
        judged = judge_pairs(cfg_judge, prompts, [f"good {i}" for i in range(n)], [f"bad {i}" for i in range(n)],
                             VerdictCache(db), both_orders=False)
    assert [v.winner for v in judged.verdicts] == ["A"] * n
    assert server.requests - before == n - stored and judged.cached == stored
