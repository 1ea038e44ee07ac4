"""Human-readable progress: every module logs to `logging.getLogger(__name__)` (all under
`raylab`), and `console()` prints those lines to standard output, message only, as the CLI,
the Python API, Ray Train workers and Tune trial drivers want them.

    from raylab.core import logs
    logs.console()                       # once per process; idempotent
    logging.getLogger("raylab").setLevel(logging.WARNING)   # quieter, from a notebook

No progress callback is threaded through functions: a caller that wants the lines elsewhere
attaches its own handler to the `raylab` logger.
"""

from __future__ import annotations

import logging
import sys


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (pytest and notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console(level: int = logging.INFO) -> None:
    """Print raylab's progress lines on standard output (idempotent)."""
    logger = logging.getLogger("raylab")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def duration(seconds: float) -> str:
    """`4m07s`, `1h02m`; `?` for a duration not known yet (NaN)."""
    if seconds != seconds:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
