"""`raylab validate` checks the world: what a config names must exist and fit, found before
anything runs, every problem at once (exit 2, each line naming its key).

    raylab validate configs/quickstart.yaml                 # schema, plan, and these checks
    raylab validate configs/quickstart.yaml --offline-check # schema and plan only

The schema (raylab/config) checks a config on its own; this module checks it against what is
outside it: the data sources' files, the model (its config only: AutoConfig, and the module
names of a skeleton built on the meta device, never the weights), referenced files (chat
template, API keys file, a SQLite database), the Ray address, and the resources the training
options need. It sits beside the pipeline because it asks several stages' questions (the data
stage's file listing, the models package's training checks) through their public modules.
"""

from __future__ import annotations

import os
import re

from raylab import data, models
from raylab.config import RaylabConfig
from raylab.core import cluster, runs
from raylab.errors import UserError

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


def problems(cfg: RaylabConfig) -> list[str]:
    """Every problem found between `cfg` and the world, one line each, naming its key.
    `offline: true` holds before the model's config is looked for (no hub retries)."""
    cluster.apply_offline(cfg)
    return _sources(cfg) + _files(cfg) + _ray(cfg) + _output(cfg) + _model(cfg)


def address_problem(address: str | None, key: str) -> str | None:
    """Why a Ray address is malformed (None when it is fine): `auto`, `local`, `HOST:PORT`
    or `ray://HOST:PORT`. Nothing is contacted; that happens when a stage connects."""
    if address is None or address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        return (f"{key}: {address!r} is a dashboard / Jobs API address; Ray itself is joined at HOST:PORT (the GCS, "
                "default port 6379), ray://HOST:10001 or auto (`raylab submit --address` takes the http:// one)")
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if "://" in hostport or not host or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{key}: {address!r} is not a Ray address; expected auto, HOST:PORT or ray://HOST:PORT (e.g. ray://head:10001)"
    return None


def _sources(cfg: RaylabConfig) -> list[str]:
    out = []
    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources.{i}"
        if src.type == "sql":
            url = src.url
            if url.startswith("sqlite:///") and "${" not in url and not os.path.isfile(url.removeprefix("sqlite:///")):
                out.append(f"{key}.url: the SQLite database {url.removeprefix('sqlite:///')} does not exist")
            continue
        if src.type == "http":
            continue  # reached when the data stage runs (a server may be up only then)
        try:
            found = data.listing(src)
        except Exception as e:  # a URI whose filesystem cannot be listed from here (credentials, network)
            out.append(f"{key}.path: cannot list {src.path}: {type(e).__name__}: {e}")
            continue
        if found:
            if src.type in ("jsonl", "json", "csv") and _is_parquet(found[0]):
                out.append(f"{key}.type: {found[0]} is a Parquet file, not {src.type}; set type: parquet")
            continue
        local = "://" not in src.path and not any(c in src.path for c in "*?[")
        if local and not os.path.exists(src.path):
            out.append(f"{key}.path: {src.path} does not exist")
        elif src.type == "text" and local and not os.path.isdir(src.path):
            out.append(f"{key}.path: a text source is a directory of .txt/.md documents; {src.path} is a file")
        else:
            exts = ", ".join(f".{e}" for e in data.extensions(src.type)) or "any file"
            out.append(f"{key}.path: no {src.type} files at {src.path} (type: {src.type} reads {exts}); "
                       "fix the path or the source's type")
    return out


def _is_parquet(path: str) -> bool:
    if "://" in path:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _files(cfg: RaylabConfig) -> list[str]:
    out = []
    for key, path in (("model.chat_template", cfg.model.chat_template), ("serve.api_keys_file", cfg.serve.api_keys_file)):
        if not path or "://" in path or "${" in path:
            continue
        if not os.path.exists(path):
            out.append(f"{key}: {path} does not exist")
        elif not os.path.isfile(path):
            out.append(f"{key}: {path} is not a file")
        elif not os.access(path, os.R_OK):
            out.append(f"{key}: {path} is not readable")
    return out


def _ray(cfg: RaylabConfig) -> list[str]:
    found = [address_problem(cfg.ray.address, "ray.address"), address_problem(os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS")]
    return [p for p in found if p]


def _output(cfg: RaylabConfig) -> list[str]:
    if cfg.pretrain is not None and "://" in cfg.output_dir:  # as train/pretrain.py refuses at run time
        return [f"pretrain: output_dir {cfg.output_dir} is not a filesystem path, and the pre-trained base is loaded "
                "from <output_dir>/pretrain by every worker; use a local path or a shared mount, or remove pretrain"]
    return []


def _model(cfg: RaylabConfig) -> list[str]:
    m = cfg.model
    if m.name_or_path.startswith("/") and os.path.isdir(m.name_or_path) and not os.path.exists(runs.model_file(m.name_or_path, runs.MODEL_CONFIG)):
        return [f"model.name_or_path: {m.name_or_path} has no config.json; expected a directory written by "
                "save_pretrained (or raylab export), a hub id, or preset:NAME"]
    try:
        found = models.training_problems(m, cfg.data.max_seq_len, cfg.train.gpus_per_worker)
    except UserError as e:  # the model does not resolve: its other checks cannot run
        return [str(e)]
    return found + _swept_modules(cfg)


def _swept_modules(cfg: RaylabConfig) -> list[str]:
    """A sweep's `model.lora.target_modules` choices, each checked like the config's own."""
    key = "model.lora.target_modules"
    dim = cfg.tune.search_space.get(key) if cfg.tune is not None else None
    if dim is None or not dim.choice or cfg.model.method == "full":
        return []
    out = []
    for i, choice in enumerate(dim.choice):
        trial = cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"target_modules": choice})})
        for line in models.training_problems(trial, cfg.data.max_seq_len, cfg.train.gpus_per_worker):
            if line.startswith(key + ":"):
                out.append(f"tune.search_space.{key}.choice.{i}:" + line.removeprefix(key + ":"))
    return out
