"""Where the audit log lives and who signs it, read from the environment of the process that
appends (the config's `governance` section sets these variables for raylab and every Ray worker
it starts: `process_env`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raylab.core import controldb, runs

if TYPE_CHECKING:
    from raylab.config import RaylabConfig

ENABLED_ENV = "RAYLAB_AUDIT"
KEY_ENV = "RAYLAB_AUDIT_KEY"
CHECKPOINTS_ENV = "RAYLAB_AUDIT_CHECKPOINTS"
KMS_ENV = "RAYLAB_AUDIT_KMS_KEY"
VARIABLES = (controldb.ENV, ENABLED_ENV, KEY_ENV, CHECKPOINTS_ENV, KMS_ENV)


@dataclass(frozen=True)
class Settings:
    database: str      # a normalised SQLAlchemy URL
    key: str           # the Ed25519 private key's local path
    checkpoints: str   # a directory or URI for signed checkpoints
    enabled: bool = True
    kms_key: str | None = None  # an AWS KMS key id/ARN/alias that signs instead of `key`

    @classmethod
    def from_env(cls, database: str | None = None, key: str | None = None,
                 checkpoints: str | None = None) -> Settings:
        """Flags first, then $RAYLAB_DATABASE_URL, $RAYLAB_AUDIT_KEY, $RAYLAB_AUDIT_CHECKPOINTS,
        $RAYLAB_AUDIT, $RAYLAB_AUDIT_KMS_KEY, then the defaults (SQLite in $RAYLAB_HOME, ~/.config/raylab,
        `default_checkpoints`)."""
        flag = os.environ.get(ENABLED_ENV, "1").strip().lower()
        db = controldb.url(database)
        return cls(database=db,
                   key=os.path.abspath(os.path.expanduser(key or os.environ.get(KEY_ENV) or str(runs.audit_key_default()))),
                   checkpoints=checkpoints or os.environ.get(CHECKPOINTS_ENV) or default_checkpoints(db),
                   enabled=flag not in ("0", "false", "no", "off"),
                   kms_key=os.environ.get(KMS_ENV) or None)


def default_checkpoints(database: str) -> str:
    """Where a chain's checkpoints go when nothing says: $RAYLAB_HOME/audit/checkpoints for the
    default database, and for any other a directory of its own beside it, named by a digest of
    the database URL (its password left out, so rotating it keeps the checkpoints). Checkpoint
    files are named by chain length, so two chains sharing one directory (a second project's
    governance.database on the same machine) overwrite each other's checkpoint N, and `verify`
    then reports the other chain as rewritten."""
    import sqlalchemy as sa

    home = runs.home()
    if database == controldb.normalise(controldb.default_url()):
        return str(home.audit_checkpoints)
    keyed = sa.engine.make_url(database).render_as_string(hide_password=True)  # the password as ***
    return str(home.audit_checkpoints.with_name(f"checkpoints-{hashlib.sha256(keyed.encode()).hexdigest()[:16]}"))


def process_env(cfg: RaylabConfig | None) -> dict[str, str]:
    """The variables above as a config sets them (its `governance` keys win over the
    environment, which wins over the defaults); variables already set pass through, so Ray
    workers append to the same chain as their driver."""
    from raylab.core.secrets import expand_env

    env = {name: os.environ[name] for name in VARIABLES if os.environ.get(name)}
    if cfg is None:
        return env
    gov = cfg.governance
    if gov.database:
        env[controldb.ENV] = expand_env(gov.database, "governance.database")
    if not gov.audit.enabled:
        env[ENABLED_ENV] = "0"
    if gov.audit.signing_key:
        env[KEY_ENV] = gov.audit.signing_key.removeprefix("file://")
    if gov.audit.checkpoints:
        env[CHECKPOINTS_ENV] = gov.audit.checkpoints
    if gov.audit.kms_key:
        env[KMS_ENV] = gov.audit.kms_key
    return env
