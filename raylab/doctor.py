"""`raylab doctor [CONFIG] [--address A]`: what a user runs first when something is off.

Prints versions, the machine (cores, torch threads, GPUs), how raylab reaches Ray and the
cluster's nodes and resources; with a config, also the model it resolves to (tokenizer
fingerprint, parameter count) and the resource plan. Exit 2 when the plan does not fit.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from raylab import cluster
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


def model_report(cfg: RaylabConfig) -> list[str]:
    from transformers.utils import logging as hf_logging

    from raylab import model

    hf_logging.disable_progress_bar()
    source = model.resolve(cfg.model.name_or_path)
    tok = model.load_tokenizer(cfg.model)
    lm = model.load_model(cfg.model)
    fp = model.fingerprint(tok)
    params = sum(p.numel() for p in lm.parameters())
    return [
        f"model: {cfg.model.name_or_path} -> {source}",
        f"  architecture {type(lm).__name__}, {params:,} parameters, dtype {next(lm.parameters()).dtype}",
        f"  tokenizer: {fp['vocab_size']} tokens, eos {tok.eos_token!r}, fingerprint {fp['fingerprint']}",
    ]


def _resource(name: str, value: float) -> str:
    if "memory" in name:
        return f"{name} {value / 2**30:.1f} GiB"
    return f"{name} {value:g}"


def run(cfg: RaylabConfig | None, address: str | None, out=sys.stdout) -> int:
    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    say("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    for line in machine():
        say(line)
    if cfg is not None:
        for line in model_report(cfg):
            say(line)

    import ray

    conn = cluster.connect(cfg, address)
    say(f"ray: {conn.mode} (address {conn.address or 'local'}, from {conn.origin}), auth {conn.auth}")
    nodes = cluster.cluster_nodes()
    for i, node in enumerate(nodes):
        say(f"  node {i}: {node.address}  {node.cpus:g} CPU  {node.gpus:g} GPU")
    resources = ray.cluster_resources()
    say("  resources: " + ", ".join(_resource(k, v) for k, v in sorted(resources.items()) if "node:" not in k))
    if cfg is None:
        return 0
    plan = cluster.make_plan(cfg, nodes)
    say("resource plan:")
    for line in plan.render().splitlines():
        say("  " + line)
    return 2 if plan.problems() else 0
