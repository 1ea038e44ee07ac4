"""core.signals.callers_handlers: what a run loop installs inside is gone on exit, the caller's
handlers are back, also when the loop raises."""

from __future__ import annotations

import contextlib
import signal
import threading

import pytest

from raylab.core import signals


def _callers(*_):
    pass


def _loops(*_):
    pass


@pytest.mark.parametrize("raises", [False, True])
def test_the_callers_handlers_are_back_after_the_block(raises):
    before = {sig: signal.signal(sig, _callers) for sig in signals.SIGNALS}
    try:
        with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
            with signals.callers_handlers():
                for sig in signals.SIGNALS:
                    signal.signal(sig, _loops)
                # the control: inside, the loop's handlers are in force
                assert all(signal.getsignal(sig) is _loops for sig in signals.SIGNALS)
                if raises:
                    raise RuntimeError("the run failed")
        assert all(signal.getsignal(sig) is _callers for sig in signals.SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_off_the_main_thread_it_is_a_no_op():
    seen = []

    def run():
        with signals.callers_handlers():
            seen.append(True)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [True]
