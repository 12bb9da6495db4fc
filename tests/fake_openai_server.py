"""A local OpenAI-compatible chat-completions server for tests: the test double for the paid API.

It speaks the real wire protocol, so the real `openai` client code path runs end to end. Failures are
scripted by markers inside the judge prompt (so concurrent requests need no shared order):
  RATE   first 2 attempts → 429 (Retry-After: 0)      FAIL   first attempt → 500
  SLOW   first attempt answers after `slow_s` (beyond the client's timeout)
  JUNK   every answer is text with no verdict         JUNK1  first answer has no verdict
  NOJSON first attempt → 200 with a body that is not JSON
  DOWN   every attempt → 503 (until `healed` is set)
Otherwise it prefers the continuation whose text starts with "good" (A if both or neither do).
Every request is counted, per marker too; requests without the expected bearer key get 401.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKERS = ("RATE", "FAIL", "SLOW", "JUNK1", "JUNK", "NOJSON", "DOWN")


class FakeOpenAIServer:
    def __init__(self, api_key: str, slow_s: float = 1.5):
        self.api_key, self.slow_s = api_key, slow_s
        self.requests = 0
        self.by_marker: Counter = Counter()
        self.attempts: Counter = Counter()     # per distinct user message
        self.seen_auth: set[str] = set()
        self.healed = False
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def plan(self, user: str) -> tuple[str, int]:
        """(marker or "", attempt number starting at 1) for this request, counted."""
        marker = next((m for m in MARKERS if re.search(rf"\b{m}\b", user)), "")
        with self.lock:
            self.requests += 1
            self.by_marker[marker] += 1
            self.attempts[user] += 1
            return marker, self.attempts[user]


def verdict_text(user: str) -> str:
    a = re.search(r"Continuation A: (\S+)", user)
    b = re.search(r"Continuation B: (\S+)", user)
    pick = "B" if (b and b.group(1).startswith("good")) and not (a and a.group(1).startswith("good")) else "A"
    return f"Comparison: continuation {pick} sounds happier.\nMore positive: {pick}"


def _handler(server: FakeOpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            auth = self.headers.get("authorization", "")
            server.seen_auth.add(auth)
            if auth != f"Bearer {server.api_key}":
                return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
            user = body["messages"][-1]["content"]
            marker, attempt = server.plan(user)
            try:
                self._respond(marker, attempt, user, body)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def _respond(self, marker: str, attempt: int, user: str, body: dict) -> None:
            if marker == "RATE" and attempt <= 2:
                return self._send(429, {"error": {"message": "slow down"}}, {"retry-after": "0"})
            if marker == "FAIL" and attempt == 1:
                return self._send(500, {"error": {"message": "boom"}})
            if marker == "DOWN" and not server.healed:
                return self._send(503, {"error": {"message": "unavailable"}})
            if marker == "SLOW" and attempt == 1:
                time.sleep(server.slow_s)
            if marker == "NOJSON" and attempt == 1:
                return self._send_raw(200, b"<html>upstream proxy error</html>", "application/json")
            text = "I like turtles." if marker == "JUNK" or (marker == "JUNK1" and attempt == 1) else verdict_text(user)
            self._send(200, {
                "id": f"cmpl-{server.requests}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(text) // 4,
                          "total_tokens": len(user) // 4 + len(text) // 4}})

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

        def _send_raw(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler
