"""What every rendered file shares: names, the cluster's run directory and registry, the
commands CI and the cluster run, and one YAML dumper.

Every target is a plain Python dict built from the config and dumped with PyYAML: no
template engine, so a rendered file is exactly what the code building it reads as.
"""

from __future__ import annotations

import os
import re
import shlex

import yaml

from raylab.config import FileSource, RaylabConfig
from raylab.errors import UserError


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # CI readers handle anchors, people reading the file less so
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None  # embedded documents (serveConfigV2, runtimeEnvYAML) stay readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: dict, header: str = "") -> str:
    """`doc` as YAML under a comment header (each line prefixed with '# '). Lines are not
    wrapped: a command line stays one line."""
    lines = "".join(f"# {line}".rstrip() + "\n" for line in header.strip("\n").splitlines())
    return lines + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1 << 16, default_flow_style=False)


def model_name(cfg: RaylabConfig) -> str:
    return cfg.registry.model_name or cfg.run_name


def name(cfg: RaylabConfig) -> str:
    """Kubernetes and `ray up` resource names: platform.name, else the model name in the
    form Kubernetes accepts (lower case, digits, '-')."""
    if cfg.platform.name:
        return cfg.platform.name
    cleaned = re.sub(r"[^a-z0-9-]+", "-", model_name(cfg).lower()).strip("-")[:40].strip("-")
    if not cleaned:
        raise UserError(f"platform.name: {model_name(cfg)!r} gives no usable resource name; set platform.name")
    return cleaned


def dashboard(cfg: RaylabConfig) -> str:
    """Where CI submits: platform.dashboard, else the rendered RayCluster's head service
    (KubeRay names it <cluster>-head-svc)."""
    return cfg.platform.dashboard or f"http://{name(cfg)}-head-svc:8265"


def serve_dashboard(cfg: RaylabConfig) -> str:
    """Where `raylab deploy` goes after a promotion: platform.serve_dashboard, else the
    rendered RayService's head service (KubeRay names it <service>-head-svc)."""
    return cfg.platform.serve_dashboard or f"http://{name(cfg)}-serve-head-svc:8265"


def config_path(cfg: RaylabConfig) -> str:
    """The config as the repository names it (relative to the directory render runs in)."""
    if cfg.source is None or cfg.source.startswith("--config-env"):
        raise UserError("raylab render needs the config as a file in the repository (CI and the cluster read it)")
    return relative(cfg.source, "CONFIG")


def relative(path: str, what: str) -> str:
    rel = os.path.relpath(os.path.abspath(path))
    if rel.startswith(".."):
        raise UserError(f"{what} {path}: outside the directory raylab render runs in ({os.getcwd()}); render from the "
                        "repository's root")
    return rel


def cluster_output_dir(cfg: RaylabConfig) -> str:
    out = cfg.platform.output_dir or cfg.output_dir
    if "://" not in out or out.startswith("file://"):
        raise UserError(f"platform.output_dir: the run directory on a cluster must be storage every node sees "
                        f"(s3://bucket/runs/{cfg.run_name}); output_dir is {out}")
    return out


def cluster_tracking_uri(cfg: RaylabConfig) -> str:
    uri = cfg.platform.tracking_uri or cfg.registry.tracking_uri
    if not uri or not uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"platform.tracking_uri: the cluster and CI need an MLflow server they reach "
                        f"(http://mlflow.mlflow.svc:5000), got {uri or 'none (the SQLite store on this machine)'}")
    return uri


def cluster_overrides(cfg: RaylabConfig) -> list[str]:
    """What every run on the cluster adds to the config: the shared run directory and
    registry, then platform.overrides."""
    return [f"output_dir={cluster_output_dir(cfg)}", f"registry.tracking_uri={cluster_tracking_uri(cfg)}",
            *cfg.platform.overrides]


def command(*words: str) -> str:
    """A shell command line; a `${NAME}` (upper case: the pipeline's variables) stays
    expandable, anything else is quoted (raylab's own `${env:NAME}` references included)."""
    def quote(w: str) -> str:
        if re.fullmatch(r"(?:[\w@%+=:,./-]|\$\{[A-Z_]+\})+", w):
            return w
        return shlex.quote(w)

    return " ".join(quote(w) for w in words)


def env(cfg: RaylabConfig) -> dict[str, str]:
    return {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_TRACKING_URI": cluster_tracking_uri(cfg)}


def watched_paths(cfg: RaylabConfig) -> list[str]:
    """What a change of retrains: the config, its suite files, its file sources inside the
    repository (directories as dir/**), platform.ci.watch."""
    paths = [config_path(cfg)]
    for suite in cfg.registry.gates.suites_read:
        paths.append(relative(suite, "registry.gates.suites"))
    for source in cfg.data.sources:
        if isinstance(source, FileSource) and "://" not in source.path:
            rel = os.path.relpath(source.path)
            if not rel.startswith(".."):
                paths.append(rel + "/**" if os.path.isdir(source.path) else rel)
    paths += cfg.platform.ci.watch
    return list(dict.fromkeys(paths))
