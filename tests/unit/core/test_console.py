"""The command's console: Ray's lines go to a log file, raylab's lines, errors and
tracebacks stay (raylab/core/console.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from raylab.core.console import is_ray_line

RAY = [  # (line, the fd it arrives on), each seen on a 2-core quickstart
    ("\x1b[33m(raylet)\x1b[0m WARNING: 32 PYTHON worker processes have been started on node", 1),
    ("\x1b[33m(raylet)\x1b[0m [2026-12-02 09:05:09,894 E 2877 2877] (raylet) worker_pool.cc:660: Some workers", 2),
    ("[2026-12-02 09:01:26,210 E 26107 26107] core_worker.cc:2465: Actor with class name: 'MapWorker'", 2),
    ("\x1b[36m(TrainController pid=3714)\x1b[0m [2026-12-02 09:03:55,711 E 3714 4076] core_worker.cc:2465: ...", 2),
    ("\x1b[36m(RayTrainWorker pid=4691)\x1b[0m Progress bars disabled. To enable, set ...", 2),
    ("\x1b[36m(Write pid=32142)\x1b[0m Skipped writing empty block to /tmp/run/data/quarantine", 2),
    ("2026-12-02 08:59:39,095\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set ...", 2),
    ("[W 2026-12-02 09:10:00,123] Trial 3 failed because of the following error: ...", 2),
    ("(pid=123, ip=10.0.0.2) 2026-12-02 08:59:39,095\tINFO streaming_executor.py:1 -- Execution plan", 1),
    ("\x1b[36m(HashShuffleReduce(keys=('exact',), partitions=8)->MapBatches(exact_edges) pid=20244)\x1b[0m "
     "[mutex.cc : 452] RAW: Lock blocking 0x559a05e4b030", 2),
    ("W1206 19:57:04.794000 16877 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass", 2),
    ("\x1b[36m(RayTrainWorker pid=4691)\x1b[0m W1206 19:57:04.794000 4691 torch/utils/_pytree.py:630] <enum", 1),
    # vLLM's logger in a Generator replica, through its engine-core process manager (stdout)
    ("\x1b[36m(ServeReplica:raylab:Generator pid=19901)\x1b[0m (MainProcess pid=19901) WARNING 12-07 15:19:35 "
     "[utils.py:648] [shutdown] Process manager: force killing remaining processes count=1", 1),
    ("\x1b[36m(ServeReplica:raylab:Generator pid=19901)\x1b[0m INFO 12-07 15:19:30 [loader.py:52] Loading weights", 1),
    ("INFO 2026-12-07 15:19:28,680 serve 15028 -- Deleting app ['raylab']", 2),  # Ray Serve on the driver
]
RAYLAB = [
    ("train: lora on preset:tiny-llama, 1 worker(s) x 2 thread(s), 29 sequences x 128 -> /tmp/run/train", 1),
    ("\x1b[36m(RayTrainWorker pid=4691)\x1b[0m train: step 2/8 (25%) loss 5.560 val 5.565 lr 1.7e-04", 1),
    ("\x1b[36m(run_trial pid=77, ip=10.0.0.2)\x1b[0m train: step 4/8 (50%) loss 5.549", 1),
    ("raylab train: error: train.lr: must be > 0", 2),
    ("Traceback (most recent call last):", 2),
    ("  File \"/work/raylab/train/loop.py\", line 12, in step", 2),
    ("RuntimeError: training failed: (pid=3) boom", 2),
    ("=== promote ===", 1),
    ("W1206: not a log line, a word that starts like one", 1),
    ("WARNING 3 of 12 answers were empty: see runs/q/smoke.json", 1),
    ("\x1b[36m(run_trial pid=77)\x1b[0m INFO 2 trials [stopped early] -- not vLLM's format", 1),
]


@pytest.mark.parametrize("line, fd", RAY)
def test_rays_lines_are_recognised(line, fd):
    assert is_ray_line(line, fd)


@pytest.mark.parametrize("line, fd", RAYLAB)
def test_raylabs_lines_errors_and_tracebacks_are_kept(line, fd):  # the negative control
    assert not is_ray_line(line, fd)


SCRIPT = textwrap.dedent("""\
    import os, sys, warnings
    from raylab.core import console
    path = console.quiet("test")
    print("data: read 120, accepted 32")
    print("\\x1b[33m(raylet)\\x1b[0m WARNING: 32 PYTHON worker processes have been started")
    sys.stdout.flush()
    os.write(2, b"[2026-12-02 09:01:26,210 E 26107 26107] core_worker.cc:2465: C++ straight to fd 2\\n")
    warnings.warn("a library's FutureWarning", FutureWarning)
    import logging
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so: a kernel for another GPU")
    print("raylab data: error: the source is missing", file=sys.stderr)
    from ray._private import ray_constants  # Ray reads RAY_DEDUP_LOGS when first imported
    print("DEDUP=" + str(ray_constants.RAY_DEDUP_LOGS))
    print("LOG=" + str(path))
    """)


def test_quiet_routes_whole_process_output(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}, "RAYLAB_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = next(line for line in proc.stdout.splitlines() if line.startswith("LOG="))[4:]
    assert proc.stdout.splitlines()[0] == "data: read 120, accepted 32"
    assert "(raylet)" not in proc.stdout and "core_worker.cc" not in proc.stderr and "FutureWarning" not in proc.stderr
    assert "_C_mxfp8" not in proc.stderr
    assert "raylab data: error: the source is missing" in proc.stderr
    assert f"Ray's own messages, 2 lines: {log}" in proc.stderr
    saved = open(log).read()
    assert "(raylet)" in saved and "core_worker.cc:2465" in saved and "a library's FutureWarning" in saved
    assert "torchao Failed to load _C_mxfp8.so" in saved
    assert "data: read" not in saved and "the source is missing" not in saved
    # Ray's log deduplication is off, so two trials' progress lines are not merged into one
    assert "DEDUP=False" in proc.stdout.splitlines()


def test_rays_log_deduplication_is_on_without_quiet():  # the control: what quiet() changes
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}
    code = "from ray._private import ray_constants; print(ray_constants.RAY_DEDUP_LOGS)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr
