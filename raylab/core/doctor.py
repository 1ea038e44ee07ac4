"""`raylab doctor [CONFIG] [--address A]`: what a user runs first when something is off.

Prints versions, the machine (cores, torch threads, GPUs), how raylab reaches Ray and the
cluster's nodes and resources; with a config, also the model it resolves to (tokenizer
fingerprint, parameter count: `raylab.models.describe`, passed in by the CLI) and the
resource plan. Exit 2 when the plan does not fit.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import TYPE_CHECKING

from raylab.core import cluster, plan

if TYPE_CHECKING:
    from raylab.config import RaylabConfig

PACKAGES = ["raylab", "ray", "torch", "transformers", "peft", "optuna", "pyarrow", "pydantic"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> list[str]:
    import torch

    lines = [
        f"cores: {cluster.physical_cores()}",
        f"torch threads (this process): {torch.get_num_threads()}",
    ]
    gpus = cluster.detected_gpus()
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    lines.append(f"GPUs: {gpus}" + (f" ({', '.join(names)})" if names else ""))
    return lines


def _resource(name: str, value: float) -> str:
    if "memory" in name:
        return f"{name} {value / 2**30:.1f} GiB"
    return f"{name} {value:g}"


def run(cfg: RaylabConfig | None, address: str | None, model_lines: list[str] = (), out=sys.stdout) -> int:
    """Print the report; `model_lines` describe the config's model (raylab.models.describe)."""

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    say("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    for line in machine():
        say(line)
    for line in model_lines:
        say(line)

    import ray

    conn = cluster.connect(cfg, address)
    say(f"ray: {conn.mode} (address {conn.address or 'local'}, from {conn.origin}), auth {conn.auth}")
    nodes = plan.cluster_nodes()
    for i, node in enumerate(nodes):
        say(f"  node {i}: {node.address}  {node.cpus:g} CPU  {node.gpus:g} GPU")
    resources = ray.cluster_resources()
    say("  resources: " + ", ".join(_resource(k, v) for k, v in sorted(resources.items()) if "node:" not in k))
    if cfg is None:
        return 0
    the_plan = plan.make_plan(cfg, nodes)
    say("resource plan:")
    for line in the_plan.render().splitlines():
        say("  " + line)
    return 2 if the_plan.problems() else 0
