"""Signal handlers that Ray's run loops leave behind.

Ray Train's `DataParallelTrainer.fit()` and Ray Tune's `Tuner.fit()` (2.60) install handlers in
the main thread (Ctrl-C aborts the run; Tune also takes SIGUSR1) and leave them installed when
they return. After `raylab.run_train` or `raylab.run_tune` in a notebook, a Ray Client session
or any longer-lived process, Ctrl-C then went to a finished run instead of raising
KeyboardInterrupt (Train's handler calls `sys.exit(0)` once its controller actor is gone).
`callers_handlers()` puts the caller's back:

    with signals.callers_handlers():
        result = trainer.fit()
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def callers_handlers(*sigs: signal.Signals) -> Iterator[bool]:
    """The main thread's handlers of `sigs` (default SIGINT and SIGUSR1) as they were on entry,
    back on exit (whatever is installed inside is in force there). Yields whether this is the
    main thread: off it nothing can be installed, and this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.getsignal(sig) for sig in sigs or SIGNALS}
    try:
        yield True
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, handler)
