"""SQLite verdict cache: rerunning an evaluation costs zero judge calls, and an interrupted one resumes.

Key = sha256 of (judge identity, template hash, prompt, response A, response B, order). Each verdict is committed
as soon as it arrives (one short transaction), so a kill loses at most the verdicts in flight. WAL journaling and
a busy timeout let several processes (a sweep's runs, a SLURM array) read and write the same file at once.
Transport failures are never stored (a rerun retries them); malformed answers are (they already cost money).
Nothing secret goes in: the identity is built from the model name, decoding settings and a credential-free URL.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from rlhf_lab.judges.base import Comparison, Usage, Verdict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,          -- sha256 of the key fields (see verdict_key)
    judge TEXT NOT NULL,           -- judge identity (no secrets)
    template TEXT NOT NULL,        -- template hash
    orientation TEXT NOT NULL,     -- "ab" | "ba"
    winner TEXT NOT NULL,          -- A | B | tie | invalid
    rationale TEXT NOT NULL,
    raw TEXT NOT NULL,
    error TEXT NOT NULL,
    requests INTEGER NOT NULL,     -- requests the verdict took when it was made
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)"""


def verdict_key(judge_identity: str, template_hash: str, item: Comparison) -> str:
    payload = json.dumps([judge_identity, template_hash, item.prompt, item.response_a, item.response_b, item.order])
    return hashlib.sha256(payload.encode()).hexdigest()


class VerdictCache:
    """One connection per thread (sqlite3 connections must not cross threads); safe across processes."""

    def __init__(self, path: Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._local = threading.local()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(_SCHEMA)
        conn.commit()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s)
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._local.conn = conn
        return conn

    def get_many(self, keys: list[str]) -> dict[str, Verdict]:
        """Cached verdicts for the keys present (marked cached=True, usage zero: they cost nothing now)."""
        found: dict[str, Verdict] = {}
        conn = self._conn()
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"SELECT key, winner, rationale, raw, error FROM verdicts WHERE key IN ({marks})",
                                chunk).fetchall()
            for key, winner, rationale, raw, error in rows:
                found[key] = Verdict(winner, rationale, raw, Usage(), error, cached=True)
        return found

    def put(self, key: str, judge_identity: str, template_hash: str, order: str, verdict: Verdict) -> None:
        """Store one verdict now (transport failures are skipped: a rerun should try them again)."""
        if verdict.transient_failure:
            return
        u = verdict.usage
        row = (key, judge_identity, template_hash, order, verdict.winner, verdict.rationale, verdict.raw,
               verdict.error, u.requests, u.prompt_tokens, u.completion_tokens, time.time())
        conn = self._conn()
        with conn:
            conn.execute("INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)

    def count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
