"""Fake reward servers on 127.0.0.1 in the test process: the GenEval reward-server protocol and an OpenAI-compatible
chat endpoint, each answering from a script of behaviours (normal, HTTP 500, too slow, malformed)."""

from __future__ import annotations

import io
import json
import pickle
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from precise_lightning.rewards.geneval import TAGS


def geneval_reply(request: dict) -> dict:
    """What the fake detector finds: score = the metadata's ``fake_score``, else the image's mean brightness; strict
    1 where the score is at least 0.5; per tag -10 for the images of other tags, as the real server."""
    scores = [m.get("fake_score", float(np.asarray(decoded(image)).mean() / 255))
              for m, image in zip(request["meta_datas"], request["images"])]
    strict = [1.0 if s >= 0.5 else 0.0 for s in scores]
    correct = [0.0 if request["only_strict"] else 1.0 for _ in scores]
    tags = [m["tag"] for m in request["meta_datas"]]
    return {"scores": scores, "rewards": correct, "strict_rewards": strict,
            "group_rewards": {t: [c if tag == t else -10.0 for c, tag in zip(correct, tags)] for t in TAGS},
            "group_strict_rewards": {t: [s if tag == t else -10.0 for s, tag in zip(strict, tags)] for t in TAGS}}


def judge_answer(request: dict) -> str:
    """A UnifiedReward-style answer: alignment 4, coherence 5, style 3, or what the caption asks for (``say:...``)."""
    text = request["messages"][0]["content"][1]["text"]
    caption = text.rsplit("Text Caption: [", 1)[1][:-1]
    if caption.startswith("say:"):
        return caption[4:]
    return "Alignment Score (1-5): 4\nCoherence Score (1-5): 5\nStyle Score (1-5): 3"


class FakeServer:
    """Records requests; ``script`` maps the 1-based request number to a behaviour: "ok", "500", "404", "slow"
    (sleeps ``slow_s``, then answers) or "garbage" (200 with a body that is not a reply)."""

    def __init__(self, kind: str, script: Callable[[int], str] = lambda n: "ok", slow_s: float = 1.0) -> None:
        self.kind, self.script, self.slow_s = kind, script, slow_s
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            counted = False  # this request is in flight on the fake's count
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    number = len(fake.requests) + 1
                    request = pickle.loads(body) if fake.kind == "geneval" else json.loads(body)
                    fake.requests.append(request | {"path": self.path, "auth": self.headers.get("Authorization")})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                self.counted = True
                try:
                    self._answer(fake.script(number), request)
                finally:
                    self._leave()

            def _leave(self) -> None:
                """Out of flight before the reply is written: once the client reads it, it may send the next one
                while this handler thread is still finishing, which must not count as a third request at once."""
                with fake.lock:
                    if self.counted:
                        fake.in_flight -= 1
                        self.counted = False

            def _answer(self, behaviour: str, request: dict) -> None:
                if behaviour == "slow":
                    time.sleep(fake.slow_s)
                if behaviour in ("500", "404"):
                    body = b"Traceback (most recent call last):\nRuntimeError: out of memory"
                    return self._send(int(behaviour), body)
                if behaviour == "garbage":
                    return self._send(200, b"<html>not a reply</html>")
                if fake.kind == "geneval":
                    return self._send(200, pickle.dumps(geneval_reply(request)))
                answer = {"choices": [{"message": {"role": "assistant", "content": judge_answer(request)}}]}
                self._send(200, json.dumps(answer).encode())

            def _send(self, status: int, body: bytes) -> None:
                self._leave()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        return Handler


@contextmanager
def serving(kind: str, script: Callable[[int], str] = lambda n: "ok", slow_s: float = 1.0):
    fake = FakeServer(kind, script, slow_s)
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def decoded(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg), formats=["jpeg"])
