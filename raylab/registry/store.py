"""The registry, on MLflow tracking + Model Registry: every run with its lineage, model
versions with checksums and gates, and aliases with a history MLflow does not keep.

    raylab models list [NAME]                         # versions, metrics, gate status, aliases
    raylab models show acme-assistant/3               # or acme-assistant@production
    raylab models evaluate acme-assistant 3           # run the gates stored with version 3
    raylab models promote acme-assistant 3            # production -> 3 (the old one: previous)
    raylab models rollback acme-assistant --reason "latency regression"
    mlflow ui --backend-store-uri sqlite:///$HOME/.raylab/mlflow/mlflow.db    # the same store

This module opens the store; tracking.py logs runs, versions.py registers, fetches and
verifies versions, aliases.py moves production/previous with a history.

Where (DESIGN.md): `registry.tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite with
artifacts under $RAYLAB_HOME/mlflow. Only driver processes call this module (the train
driver after its run; the sweep driver for its trials, from Tune's results), never Train
workers or concurrent trials. Alias moves may be concurrent: locks.py serialises them.

Logging is idempotent: a run carries a `raylab.key` tag (its directory and identity), so
re-running a finished stage finds its MLflow run and version instead of adding new ones.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import runs
from raylab.core.secrets import redact_url, scrub, url_secrets
from raylab.errors import UserError

PRODUCTION, PREVIOUS = "production", "previous"


@dataclass
class Store:
    client: Any  # mlflow.MlflowClient
    uri: str
    artifact_root: str | None  # for new experiments; None lets an MLflow server decide
    lock_timeout_s: float = 60.0  # how long a promote or rollback waits for the model's alias lock


def locate(tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact root): the config's, else $MLFLOW_TRACKING_URI, else SQLite
    under $RAYLAB_HOME/mlflow. A SQLite store keeps its artifacts beside the database."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs.home().mlflow_db}"
    if uri.startswith("sqlite:///"):
        return uri, str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    return uri, None


def _check_reachable(uri: str, key: str) -> None:
    """Exit 2 naming the URI (redacted: a database URL often holds a password)."""
    shown = redact_url(uri)
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # InvalidURL too
            reason = scrub(str(getattr(e, "reason", None) or e), url_secrets(uri))
            raise UserError(f"{key} {shown}: MLflow server not reachable ({reason}); start it or fix the URI") from None
    elif uri.startswith("sqlite:///"):
        try:
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{key} {shown}: cannot create the registry directory ({e.strerror})") from None
    elif "://" in uri and not uri.startswith(("file://", "databricks", "postgresql", "mysql", "mssql")):
        raise UserError(f"{key} {shown}: not a tracking URI MLflow understands (http(s)://, sqlite:///, a database URL)")


def open_store(cfg: RaylabConfig | None = None, tracking_uri: str | None = None) -> Store:
    """An MLflow client on the registry; exit 2 if it cannot be reached."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny file is noise
    # A dead server otherwise costs minutes of retries before the error.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    configured = tracking_uri or (cfg.registry.tracking_uri if cfg else None)
    key = "registry.tracking_uri" if configured else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "registry")
    uri, root = locate(configured)
    if cfg is not None and cfg.registry.artifact_location:
        root = cfg.registry.artifact_location.rstrip("/")
    _check_reachable(uri, key)
    import logging

    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema creation chatter on first use
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return Store(MlflowClient(tracking_uri=uri, registry_uri=uri), uri, root)


def model_name(cfg: RaylabConfig) -> str:
    name = cfg.registry.model_name or cfg.run_name
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise UserError(f"registry.model_name: the run name {name!r} is not a usable model name; set "
                        "registry.model_name (letters, digits, '.', '_', '-')")
    return name


