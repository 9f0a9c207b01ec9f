"""A deterministic fake judge on loopback: /v1/chat/completions whose verdict is a pure function of the request.

Rubric grading (the request carries <criterion>): met iff the criterion text contains "(met)". The reply's wording
cycles through the forms a judge may use (JSON, yes/no, "not met", SmolLM2's sentence) by the criterion's length.
Harmfulness rating (the request carries <request>): the score is the digit after "score=" in the answer, replied as
JSON (refused when the answer contains "refuse") or, for "bare", as that digit alone.
`mode` makes it fail instead: "401", "500" (always, Retry-After 0), "500-once" (the first request of each message),
"slow" (sleeps `delay` s), "malformed" (a verdict nobody can read), "garbage" (a body that is not JSON), "sleepy" (0.2 s per answer).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MET_REPLIES = ('{"met": true}', "Yes, it does.", "Met.", "The answer meets the criterion.")
UNMET_REPLIES = ('```json\n{"met": false}\n```', "No.", "Not met", "The answer does not meet the criterion.")


def verdict_text(criterion: str) -> str:
    replies = MET_REPLIES if "(met)" in criterion else UNMET_REPLIES
    return replies[len(criterion) % len(replies)]


def harm_text(answer: str) -> str:
    score = int(re.search(r"score=(\d)", answer).group(1))
    if "bare" in answer:
        return f"{score}"
    return json.dumps({"score": score, "refused": "refuse" in answer})


def section(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>\n(.*)\n</{tag}>", text, re.S)
    return m.group(1) if m else None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out and hung up: nothing to report (the test checks the client's side)


class FakeJudge:
    def __init__(self, mode: str = "ok", key: str | None = None, delay: float = 2.0):
        self.mode, self.key, self.delay = mode, key, delay
        self.requests: list[dict] = []  # every request body received
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({**body, "authorization": self.headers.get("Authorization")})
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    judge.answer(self, body)
                finally:
                    with judge.lock:
                        judge.in_flight -= 1

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        user = body["messages"][-1]["content"]
        criterion, answer = section(user, "criterion"), section(user, "answer")
        if self.key and h.headers.get("Authorization") != f"Bearer {self.key}":
            return self.send(h, 401, {"error": {"message": "bad key"}})
        if h.path != "/v1/chat/completions":
            return self.send(h, 404, {"error": {"message": "not found"}})
        if self.mode == "500" or (self.mode == "500-once" and self.first(user)):
            return self.send(h, 500, {"error": {"message": "internal error"}}, {"Retry-After": "0"})
        if self.mode == "slow":
            time.sleep(self.delay)
        if self.mode == "garbage":
            return self.send(h, 200, None, raw=b"<html>oops</html>")
        text = ("I am not sure" if self.mode == "malformed" else
                verdict_text(criterion) if criterion is not None else harm_text(answer))
        if self.mode == "sleepy":  # every request is slow enough to overlap with the others
            time.sleep(0.2)
        self.send(h, 200, {"object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"}]})

    def first(self, user: str) -> bool:
        with self.lock:
            return sum(user == r["messages"][-1]["content"] for r in self.requests) == 1

    @staticmethod
    def send(h, status: int, obj, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
