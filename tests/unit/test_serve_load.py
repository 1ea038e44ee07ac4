"""The serving tests' load helper (tests/serve_load.py) records every way a request can go
wrong, against a small local HTTP server that answers each path one way: a whole stream, a
stream cut without [DONE], an error event, a 500 whose body is not JSON, a reset, an answer
slower than the client's timeout. A client thread that dies, or does not end when stopped,
fails `check()`."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from http_helpers import Handler, serving

from serve_load import Load, stream

EVENT = 'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": null}]}\n\n'


class Scripted(Handler):

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            return
        if self.path == "/bad":
            self._head(500, "text/plain")
            self.wfile.write(b"Internal Server Error")
            return
        self._head(200, "text/event-stream")
        self.wfile.write(EVENT.encode())
        self.wfile.flush()
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/error":
            self.wfile.write(b'data: {"error": {"message": "lost", "type": "server_error", "param": null, '
                             b'"code": "replica_lost"}}\n\n')
        elif self.path in ("/done", "/slow"):
            self.wfile.write(b"data: [DONE]\n\n")
        # "/cut": the stream just ends

    def _head(self, status: int, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Connection", "close")
        self.end_headers()


@pytest.fixture(scope="module")
def url():
    with serving(Scripted) as base:
        yield base


@pytest.mark.parametrize("path,status,error", [("/done", 200, None), ("/cut", 200, "truncated"),
                                                ("/error", 200, "replica_lost"), ("/bad", 500, "http_500")])
def test_stream_outcomes(url, path, status, error):
    marked = []
    got = stream(url, path, {}, mark=lambda: marked.append(1))
    assert got[:2] == (status, error)
    assert marked == ([] if path == "/bad" else [1]) and got[2] == ("Internal Server Error" if path == "/bad" else "hi")  # a bad body is kept to read


def test_resets_and_timeouts_are_recorded_outcomes_and_failed_requests_are_retried(url):
    calls = iter(["/reset", "/slow", "/done"] * 100)
    with Load(1, lambda i, mark: stream(url, next(calls), {}, timeout_s=0.5), retries=1) as load:
        while len(load.outcomes) < 3:
            time.sleep(0.05)
    load.check()
    first = load.outcomes[:3]
    assert [o.error for o in first[:2]] == ["ConnectionResetError", "TimeoutError"], first
    assert [(o.request, o.attempt) for o in first] == [(0, 0), (0, 1), (1, 0)]  # one retry, then the next request
    assert first[2].ok and load.success_rate() < 1


def test_a_dead_or_hung_client_thread_fails_the_check(url):
    def dies(i, mark):
        raise SystemExit("a client thread that dies")

    with Load(1, dies) as load:
        pass
    with pytest.raises(AssertionError, match="SystemExit"):
        load.check()
    release = threading.Event()
    with Load(1, lambda i, mark: (release.wait(), (200, None, ""))[1], join_s=0.2) as load:
        pass
    with pytest.raises(AssertionError, match="still running"):
        load.check()
    release.set()
