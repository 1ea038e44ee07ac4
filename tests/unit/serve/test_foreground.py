"""`wait_until_stopped` (raylab serve in the foreground): Ctrl-C and SIGTERM stop it while it
waits, and the caller's own handlers are back afterwards (run_serve called from Python)."""

from __future__ import annotations

import os
import signal
import threading

from raylab.serve import wait_until_stopped


def test_sigint_stops_the_wait_and_the_callers_handlers_come_back():
    seen = []

    def mine(*_):
        seen.append("caller")

    old_int = signal.signal(signal.SIGINT, mine)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        # The SIGINT arrives during the wait: it stops it and never reaches the caller's handler.
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        wait_until_stopped()
        assert seen == []
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is old_term
        # the control: the caller's handler is live again
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == ["caller"]
    finally:
        signal.signal(signal.SIGINT, old_int)
