"""Embedded Ray start-up: raylab.core.cluster.connect vs a bare ray.init(address="local").

Each sample starts a fresh Python process (Ray initialises once per process), so both sides
pay the same interpreter and import cost; the ratio shows what raylab's explicit settings
(auth mode, telemetry off, logical CPUs, no dashboard) add to or save from Ray's defaults.

    python benchmarks/bench_connect.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measurement, timed, write_results  # noqa: E402

RAYLAB = "from raylab.core import cluster; import ray; cluster.connect(None); ray.cluster_resources(); ray.shutdown()"
BARE = "import ray; ray.init(address='local'); ray.cluster_resources(); ray.shutdown()"


def run(code: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # Interleave warm-up of both so file-system caches favour neither side.
    run(BARE)
    run(RAYLAB)
    bare = timed(lambda: run(BARE), repeat=args.repeat)
    ours = timed(lambda: run(RAYLAB), repeat=args.repeat)
    record = measurement(
        "embedded_ray_start_s", ours["median"], "s", "ray.init(address='local') defaults", bare["median"],
        samples=ours["samples"], baseline_samples=bare["samples"],
    )
    write_results("connect", [record])


if __name__ == "__main__":
    main()
