"""The console a person reads: raylab's lines, not Ray's.

Ray forwards each worker's standard output and error to the driver with a `(Name pid=N)`
prefix, the raylet pushes its warnings (`(raylet) WARNING: 32 PYTHON worker processes have
been started ...`), Ray's C++ core writes glog lines (`[2026-... E 123 456] core_worker.cc:
...`) straight to file descriptor 2, and Ray Data, Tune and Optuna log through their own
handlers (vLLM and Ray Serve too, in their own formats). On a laptop's terminal those read
as failures. So the `raylab` command (not the Python API, and not with `--verbose`) sends
them to a log file and keeps everything else: raylab's own lines (the driver's, and the
workers' standard output, which is where raylab's progress lines go), its errors, and any
traceback. It also turns off Ray's log deduplication (see quiet()).

    log_file = console.quiet("train")     # once, from the command's entry point

Why file descriptors and not `sys.stdout`: the C++ lines never pass through Python, so the
filter sits on fds 1 and 2 (a pipe each, read by a thread that routes whole lines). Ray
starts its own processes with their output in its session's log files, so they do not hold
these pipes; on exit the original descriptors come back and the pipes drain.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from raylab.core import storage

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's prefix on forwarded lines: `(raylet) `, `(Name pid=N) `, `(Name pid=N, ip=A) `; a
# Ray Data operator's name holds parentheses of its own.
_WORKER = re.compile(r"^\((?:raylet|.*?\bpid=\d+(?:, ip=[^)\s]+)?)\) ?")
_GLOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEFC] \d+ \d+\]")  # Ray's C++ core
_RAY_PY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # Ray's loggers
_OPTUNA = re.compile(r"^\[[DIWEC] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\]")  # Optuna's default handler
# torch's own logging (torch._logging's glog-style handler): `W1206 19:57:04.794000 16877
# torch/utils/_pytree.py:630] ...`, e.g. the deprecation torchao's import triggers in every process
_TORCH = re.compile(r"^[DIWEFC]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
# vLLM's logger, in a Generator replica and its engine-core process (which prefixes its own
# process name): `(EngineCore_DP0 pid=20061) WARNING 12-07 15:19:35 [utils.py:648] ...`
_VLLM = re.compile(r"^(?:\([^()]*\bpid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[\w./-]+:\d+\] ")
# Ray Serve's logger on the driver: `INFO 2026-12-07 15:19:28,680 serve 15028 -- Deleting app ['raylab']`
_SERVE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ \d+ -- ")
# Libraries whose Python loggers warn at import with no handler of their own (Python's last
# resort prints the bare message on stderr): torchao's "Failed to load .../_C_mxfp8...so" for
# kernels built for GPUs this machine does not have.
LIBRARY_LOGGERS = ("torchao",)


def is_ray_line(line: str, fd: int) -> bool:
    """Whether a console line is Ray's (or Optuna's, or torch's) own output rather than raylab's.

    Workers' standard output (fd 1) is kept, since raylab's progress lines from Train
    workers and Tune trials arrive that way; what workers write to standard error is Ray's
    logging, warnings and C++ lines."""
    text = _ANSI.sub("", line)
    if text.startswith("(raylet)") or _library(text):
        return True
    forwarded = _WORKER.match(text)
    if forwarded:
        return fd == 2 or _library(text[forwarded.end():])
    return False


def _library(text: str) -> bool:
    return any(p.match(text) for p in (_GLOG, _RAY_PY, _OPTUNA, _TORCH, _VLLM, _SERVE))


class _Router:
    """One file descriptor's lines: Ray's to the log file, the rest to where they went before."""

    def __init__(self, fd: int, sink, lock: threading.Lock):
        self.fd, self.sink, self.lock, self.diverted = fd, sink, lock, 0
        self.original = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name=f"raylab-console-{fd}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._route(line + b"\n")
        if pending:
            self._route(pending)

    def _route(self, line: bytes) -> None:
        if is_ray_line(line.decode("utf-8", "replace"), self.fd):
            with self.lock:
                self.sink.write(line)
            self.diverted += 1
        else:
            os.write(self.original, line)

    def restore(self) -> None:
        os.dup2(self.original, self.fd)  # the pipe's last writer closes: the thread sees EOF
        self.thread.join(5)
        if not self.thread.is_alive():
            os.close(self.read)


class _LogHandler(logging.Handler):
    def __init__(self, sink, lock: threading.Lock):
        super().__init__()
        self.sink, self.file_lock = sink, lock  # not `self.lock`: logging.Handler holds that one around emit()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with self.file_lock:
            self.sink.write((self.format(record) + "\n").encode("utf-8", "replace"))


def quiet(verb: str) -> Path:
    """Route Ray's console output to $RAYLAB_HOME/logs/raylab-<verb>-<time>-<pid>.log for the
    rest of this process (Python warnings too); returns that file. Call once, early."""
    # Ray's log deduplication merges workers' lines that differ only in ids or numbers into
    # one line plus "[repeated 2x across cluster] (Ray deduplicates logs by default ...)", so
    # two trials' progress lines read as one trial's. Read when Ray is first imported, which
    # the command has not done yet; RAY_DEDUP_LOGS=1 in the environment keeps Ray's way.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    home = Path(os.environ.get("RAYLAB_HOME") or Path.home() / ".raylab")
    path = home / "logs" / f"raylab-{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = storage.open_local_log(str(path))
    lock = threading.Lock()
    warnings_log = logging.getLogger("py.warnings")  # Python warnings (transformers' FutureWarnings...)
    handler = _LogHandler(log, lock)
    warnings_log.addHandler(handler)
    warnings_log.propagate = False
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).propagate = False
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    routers = [_Router(fd, log, lock) for fd in (1, 2)]

    def restore() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for r in routers:
            r.restore()
        for logger in (warnings_log, *map(logging.getLogger, LIBRARY_LOGGERS)):
            logger.removeHandler(handler)
        diverted = sum(r.diverted for r in routers)
        if diverted:
            os.write(2, f"(Ray's own messages, {diverted} lines: {path}; --verbose shows them here)\n".encode())
        log.close()

    atexit.register(restore)
    return path
