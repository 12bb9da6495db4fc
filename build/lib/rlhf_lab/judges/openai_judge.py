"""OpenAI-compatible chat-completions judge (GPT-4-class APIs, vLLM, TGI, llama.cpp server, Ollama).

The client's own retries are off (`max_retries=0`): this module retries 429 / 408 / 5xx / timeouts / connection
errors itself, with exponential backoff and full jitter (honouring Retry-After), so every request and retry is
counted. An answer with no readable verdict is asked again `malformed_retries` times, then counted invalid.
Retries exhausted → an invalid verdict marked as a transport failure (not cached, so a rerun tries again). A
rejected key (401/403) stops the evaluation with a message naming the variable: every answer would fail alike.

The API key comes only from the environment variable named in config or a secrets file; it is handed to the
client and nowhere else (not to the identity, logs, cache or reports).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai

from rlhf_lab.judges.base import Comparison, Judge, OnResult, Usage, Verdict
from rlhf_lab.judges.config import OpenAIJudgeConfig
from rlhf_lab.judges.templates import JudgeTemplate, parse_verdict
from rlhf_lab.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429}


class JudgeAuthError(UserError):
    """The server rejected the API key: no point judging anything else."""


def resolve_api_key(cfg: OpenAIJudgeConfig) -> str:
    """The key from `cfg.api_key_env`, else from `cfg.api_key_file`; errors name where it was looked for."""
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key and cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key 'judge.api_key_file': no such file {path}")
        if path.stat().st_mode & 0o077:
            log.warning("secrets file %s is readable by group/others; chmod 600 it", path)
        key = path.read_text().strip()
    if key:
        return key
    if cfg.api_key_required:
        raise ConfigError(f"judge {cfg.name!r}: no API key: set the environment variable {cfg.api_key_env} "
                          f"(config key 'judge.api_key_env') or 'judge.api_key_file'")
    return "no-key-required"  # local servers ignore it, but the client insists on a value


def public_url(url: str | None) -> str:
    """The base URL without credentials or query string (safe for identities and logs)."""
    if not url:
        return "default"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)], at least Retry-After."""
    delay = rng.uniform(0, min(cap, base * 2 ** attempt))
    if retry_after is not None:
        delay = max(delay, min(cap, retry_after))
    return delay


class OpenAIJudge(Judge):
    def __init__(self, cfg: OpenAIJudgeConfig, template: JudgeTemplate, seed: int = 0):
        self.cfg, self.template, self.name = cfg, template, cfg.name
        self.client = openai.OpenAI(api_key=resolve_api_key(cfg), base_url=cfg.base_url, timeout=cfg.timeout,
                                    max_retries=0)
        self.stats: Counter = Counter()   # requests, retries, rate_limited, server_errors, timeouts, ...
        self._lock = threading.Lock()
        self._rng = random.Random(seed)   # jitter only; verdicts do not depend on it

    def identity(self) -> str:
        c = self.cfg
        return (f"openai|{c.model}|{public_url(c.base_url)}|temperature={c.temperature}|max_tokens={c.max_tokens}"
                f"|template={self.template.hash()}")

    @property
    def template_hash(self) -> str:
        return self.template.hash()

    def usage_cost_usd(self, usage: Usage) -> float:
        return (usage.prompt_tokens * self.cfg.price_per_1k_prompt
                + usage.completion_tokens * self.cfg.price_per_1k_completion) / 1000.0

    def judge_many(self, items: Sequence[Comparison], on_result: OnResult | None = None) -> list[Verdict]:
        results: list[Verdict | None] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self._judge_one, item): i for i, item in enumerate(items)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    if on_result is not None:
                        on_result(i, results[i])  # in the caller's thread: cache writes need no locking
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return results  # type: ignore[return-value]

    def _judge_one(self, item: Comparison) -> Verdict:
        messages = self.template.messages(item.prompt, item.response_a, item.response_b)
        usage, raw = Usage(), ""
        for _ in range(1 + self.cfg.malformed_retries):
            outcome = self._request(messages)
            if isinstance(outcome, Verdict):  # transport failure after all retries
                return Verdict("invalid", "", raw, usage + outcome.usage, outcome.error)
            raw, step_usage = outcome
            usage = usage + step_usage
            winner, rationale = parse_verdict(raw, self.template)
            if winner is not None:
                return Verdict(winner, rationale, raw, usage)
            self._count("malformed")
        return Verdict("invalid", "", raw, usage, "malformed")

    def _request(self, messages: list[dict]) -> tuple[str, Usage] | Verdict:
        """One answer, retrying transient failures; a Verdict (invalid, transport) when they never clear."""
        requests, last_error = 0, ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count("retries")
            requests += 1
            self._count("requests")
            try:
                response = self.client.chat.completions.create(
                    model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens)
            except openai.AuthenticationError as e:
                raise JudgeAuthError(f"judge {self.name!r}: the server rejected the API key from "
                                     f"{self.cfg.api_key_env} (HTTP {e.status_code})") from None
            except openai.PermissionDeniedError as e:
                raise JudgeAuthError(f"judge {self.name!r}: permission denied for model {self.cfg.model!r} "
                                     f"(HTTP {e.status_code})") from None
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                kind, retry_after = _classify(e)
                self._count(kind)
                if kind == "client_error":  # e.g. 400 context too long: deterministic, so cached as invalid
                    return Verdict("invalid", usage=Usage(requests), error=f"rejected: HTTP {e.status_code}")
                last_error = f"transport: {kind}"
                if attempt < self.cfg.max_retries:
                    time.sleep(backoff_delay(attempt, self.cfg.backoff_base, self.cfg.backoff_max, retry_after,
                                             self._rng))
                continue
            except (openai.APIResponseValidationError, ValueError) as e:  # 200 with a body that is not JSON
                self._count("malformed_body")
                return f"<unreadable response body: {type(e).__name__}>", Usage(requests)
            return _answer_text(response), _usage(response, requests)
        log.warning("judge %s: giving up on a comparison after %d requests (%s)", self.name, requests, last_error)
        return Verdict("invalid", usage=Usage(requests), error=last_error)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def close(self) -> None:
        self.client.close()


def _classify(error: Exception) -> tuple[str, float | None]:
    """(counter name, Retry-After seconds or None) for a failed request."""
    if isinstance(error, openai.APITimeoutError):
        return "timeouts", None
    if isinstance(error, openai.APIConnectionError):
        return "connection_errors", None
    status = getattr(error, "status_code", 0)
    retry_after = _retry_after(getattr(error, "response", None))
    if status == 429:
        return "rate_limited", retry_after
    if status >= 500 or status in _RETRY_STATUS:
        return "server_errors", retry_after
    return "client_error", None


def _retry_after(response) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _answer_text(response) -> str:
    """The first choice's text; "" when the body has no usable choice (then parsing counts it malformed)."""
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError, KeyError):
        return ""
    return content if isinstance(content, str) else ""


def _usage(response, requests: int) -> Usage:
    u = getattr(response, "usage", None)
    prompt = getattr(u, "prompt_tokens", 0) or 0
    completion = getattr(u, "completion_tokens", 0) or 0
    return Usage(requests, int(prompt), int(completion))
