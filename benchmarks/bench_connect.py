"""Embedded Ray start-up: raylab.core.cluster.connect against a bare ray.init, with the
same dashboard setting on both sides.

Protocol: benchmarks/README.md (version 1): A and B alternate, 5 pairs per point after one
untimed pair, median and interquartile range of the per-pair ratios, clean commit.

Each sample is a fresh Python process (Ray initialises once per process), so both sides
pay the interpreter and their imports. Metric: wall clock from just before the process is
started to the moment `ray.cluster_resources()` returned inside it (shutdown excluded).

1. `embedded_start_no_dashboard_s`: A `cluster.connect(None)` (what `raylab data` and
   `raylab validate` use: no dashboard) against B `ray.init(address="local",
   include_dashboard=False)`.
2. `embedded_start_state_api_s`: A `cluster.connect(None, state_api=True)` (what `raylab
   train`, `tune`, `run` and `serve` use: the dashboard, which serves Ray's state API)
   against B `ray.init(address="local", include_dashboard=True)`.

Goal (both points): <= 1.05 (raylab's settings add no more than 5 % to Ray's own start).

    make bench NAME=connect      (or: python benchmarks/bench_connect.py [--repeats 5])
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, point, require_clean_commit, write_results  # noqa: E402

READY = "import time; print('READY', time.time(), flush=True); ray.shutdown()"
SIDES = {
    "embedded_start_no_dashboard_s": (
        "from raylab.core import cluster; import ray; cluster.connect(None); ray.cluster_resources(); " + READY,
        "import ray; ray.init(address='local', include_dashboard=False); ray.cluster_resources(); " + READY),
    "embedded_start_state_api_s": (
        "from raylab.core import cluster; import ray; cluster.connect(None, state_api=True); ray.cluster_resources(); " + READY,
        "import ray; ray.init(address='local', include_dashboard=True); ray.cluster_resources(); " + READY),
}


def start_s(code: str) -> float:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("READY")).split()[1]) - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    require_clean_commit()
    records = []
    for name, (ours, bare) in SIDES.items():
        s = alternate(lambda ours=ours: start_s(ours), lambda bare=bare: start_s(bare), args.repeats)
        records.append(point(name, "s", ("raylab cluster.connect", s["a"]), ("ray.init", s["b"]), goal="<= 1.05",
                             goal_ratio=1.05, higher_is_better=False, warmup=True, load=s["load"],
                             a_code=ours, b_code=bare))
    write_results("connect", records)


if __name__ == "__main__":
    main()
