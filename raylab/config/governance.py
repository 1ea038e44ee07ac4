"""The `governance:` section: the control-plane database and the audit log.

    governance:
      database: ${env:RAYLAB_PG}        # default $RAYLAB_DATABASE_URL, else SQLite at $RAYLAB_HOME/raylab.db
      audit:
        signing_key: /etc/raylab/audit-ed25519.pem   # apart from the database (docs/governance.md)
        checkpoints: s3://audit-bucket/raylab/checkpoints
      card:                                # what every registered version's model card says
        intended_use: Answer Acme customers' questions about orders, returns and widgets.
        out_of_scope_use: Legal, medical or financial advice; decisions about people.
        base_pretraining_tokens: 2.0e12   # the base's pre-training tokens, for the EU AI Act comparison

      encryption: {enabled: true, provider: local}   # or aws-kms with kms_key (raylab/core/crypto.py)
      oidc:                                # bearer tokens from the company's identity provider
        issuer: https://login.acme.example/realms/acme
        audience: raylab
        jwks_url: https://login.acme.example/realms/acme/protocol/openid-connect/certs
        role_claim: realm_access.roles
        org_claim: org

`allow_remote` lets a stage send text to an endpoint off this machine (raylab synth).
The audit log and the database are described in raylab/core/audit/, the model card and
datasheet in raylab/registry/cards.py and raylab/data/datasheet.py.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylab.config.types import PathOrUri, Section

DATABASE_SCHEMES = re.compile(r"^(sqlite:///|postgres(ql)?(\+psycopg2)?://|\$\{env:)")


class AuditConfig(Section):
    """The tamper-evident audit log of every state change (`raylab audit verify|log|export`)."""

    enabled: bool = Field(True, description="append every state change to the hash-chained audit log; "
                          "default $RAYLAB_AUDIT (0 turns it off), else on")
    signing_key: PathOrUri | None = Field(
        None, description="Ed25519 private key (PEM, mode 0600) that signs checkpoints, created on first use; "
                          "default $RAYLAB_AUDIT_KEY, else ~/.config/raylab/audit-ed25519.pem. Keep it apart "
                          "from the database: whoever can read it can forge a consistent chain")
    checkpoints: PathOrUri | None = Field(
        None, description="where signed checkpoints (head hash, length) are written: a directory or URI (s3://); "
                          "default $RAYLAB_AUDIT_CHECKPOINTS, else $RAYLAB_HOME/audit/checkpoints (with a non-default "
                          "governance.database: $RAYLAB_HOME/audit/checkpoints-<digest of its URL>)")

    kms_key: str | None = Field(
        None, description="an AWS KMS key (id, ARN or alias/NAME; KeySpec ECC_NIST_P256, KeyUsage SIGN_VERIFY) "
                          "that signs checkpoints instead of signing_key, so no private key is on disk; needs "
                          "boto3 (the `s3` extra) and AWS credentials; default $RAYLAB_AUDIT_KMS_KEY")

    @field_validator("signing_key")
    @classmethod
    def _local_key(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("file://"):
            raise ValueError(f"the signing key must be a local file (got {value!r}); "
                             "a key in an object store beside the data defeats its purpose")
        return value


class CardConfig(Section):
    """What a model card says that no stage output knows (`raylab models card REF`)."""

    intended_use: str | None = Field(
        None, description="what the model is for and who uses it: the card's intended-use section (the card "
                          "says 'not stated' without it)")
    out_of_scope_use: str | None = Field(
        None, description="uses the model is not meant or fit for: the card's out-of-scope section")
    license: str | None = Field(
        None, description="the fine-tuned model's licence as a Hugging Face licence id (apache-2.0, mit, llama3, "
                          "other, ...); default: raylab's own (apache-2.0) for a preset base it builds, else unknown")
    authors: list[str] = Field(default_factory=list, description="who built the model (people or a team)")
    contact: str | None = Field(None, description="where questions and incident reports go (an address or URL)")
    base_parameters: int | None = Field(
        None, ge=1, description="the base model's parameter count, when raylab cannot count it from a local "
                                "safetensors checkpoint (a hub id it has not downloaded)")
    base_pretraining_tokens: float | None = Field(
        None, gt=0, description="tokens the base model was pre-trained on (its model card or paper): with the "
                                "parameter count this estimates its pre-training compute as 6*N*D for the EU AI "
                                "Act comparison; without it the card says that comparison is unknown")


class EncryptionConfig(Section):
    """Encryption at rest of every file raylab writes (raylab/core/crypto.py, docs/governance.md)."""

    enabled: bool = Field(False, description="encrypt every file raylab writes (shards, quarantine, tokenizer, "
                          "checkpoints, adapters, merged models, reports, events) with AES-256-GCM, a fresh data "
                          "key per file wrapped by the provider's key")
    provider: Literal["local", "aws-kms"] = Field(
        "local", description="who holds the key-encryption key: local (a key ring file, for a laptop) or aws-kms "
                             "(AWS KMS makes and unwraps the data keys; boto3 and AWS credentials)")
    key_file: PathOrUri | None = Field(
        None, description="local: the key ring (JSON, mode 0600), created on first use; keep it apart from the "
                          "data; default ~/.config/raylab/data-keys.json")
    kms_key: str | None = Field(None, description="aws-kms: the key (id, ARN or alias/NAME; SYMMETRIC_DEFAULT)")
    kms_endpoint: str | None = Field(None, description="aws-kms: an endpoint URL (a VPC endpoint, a test server); "
                                     "default AWS_ENDPOINT_URL_KMS, else AWS's")

    @field_validator("key_file")
    @classmethod
    def _local_key_file(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("file://"):
            raise ValueError(f"the key ring must be a local file (got {value!r}); keys in the object store "
                             "beside the data they protect protect nothing")
        return value.removeprefix("file://") if value else value

    @model_validator(mode="after")
    def _provider_keys(self) -> EncryptionConfig:
        if self.enabled and self.provider == "aws-kms" and not self.kms_key:
            raise ValueError("provider aws-kms needs governance.encryption.kms_key (a key id, ARN or alias/NAME)")
        if self.provider == "local" and (self.kms_key or self.kms_endpoint):
            raise ValueError("kms_key and kms_endpoint are for provider aws-kms; set provider: aws-kms")
        return self


class OidcConfig(Section):
    """OIDC bearer tokens (JWTs) accepted beside raylab's API keys (raylab/core/access/oidc.py)."""

    issuer: str = Field(description="the issuer (`iss`) tokens must name, exactly as the identity provider writes it")
    audience: str = Field(description="the audience (`aud`) tokens must be issued for: this raylab's client id")
    jwks_url: str | None = Field(None, description="the issuer's JWKS URL (its public signing keys; fetched and "
                                 "cached, fetched again for an unknown key id)")
    jwks_file: PathOrUri | None = Field(None, description="a JWKS file instead of jwks_url, for machines that cannot "
                                        "reach the issuer (keep it current when the issuer rotates keys)")
    role_claim: str = Field("roles", description="the claim holding the raylab role(s): a string or a list; a dotted "
                            "path for nested claims (realm_access.roles)")
    org_claim: str = Field("org", description="the claim naming the caller's organisation")
    subject_claim: str = Field("sub", description="the claim naming the caller (audit actor, separation of duties)")
    algorithms: list[Literal["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]] = Field(
        default_factory=lambda: ["RS256"], min_length=1,
        description="signature algorithms accepted (asymmetric only: an HMAC token would be keyed with a public key)")
    leeway_s: float = Field(30.0, ge=0, le=300, description="clock skew allowed on exp/nbf/iat, in seconds")

    @model_validator(mode="after")
    def _one_key_source(self) -> OidcConfig:
        if bool(self.jwks_url) == bool(self.jwks_file):
            raise ValueError("set exactly one of jwks_url (the issuer's key set URL) and jwks_file")
        if self.jwks_url and not self.jwks_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ValueError(f"jwks_url {self.jwks_url!r}: expected https:// (plain http only on loopback)")
        return self


class GovernanceConfig(Section):
    """raylab's own records (the control-plane database) and the audit log."""

    database: str | None = Field(
        None, description="control-plane database URL: sqlite:///FILE or postgresql://... (psycopg2, the "
                          "`postgres` extra); a ${env:NAME} reference for one with a password; default "
                          "$RAYLAB_DATABASE_URL, else SQLite at $RAYLAB_HOME/raylab.db")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="the audit log")
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig, description="encryption at rest")
    card: CardConfig = Field(default_factory=CardConfig, description="the model card's statements (intended use, licence)")
    oidc: OidcConfig | None = Field(None, description="accept OIDC bearer tokens from this issuer (docs/governance.md); "
                                    "default: raylab API keys only")
    allow_remote: bool = Field(
        False, description="let stages send data to an endpoint off this machine (`raylab synth`'s "
                           "synth.endpoint.base_url); default: loopback endpoints only")

    @field_validator("database")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not DATABASE_SCHEMES.match(value):
            raise ValueError(f"expected sqlite:///FILE, postgresql://USER@HOST/DB or a ${{env:NAME}} reference, "
                             f"got {value.split('://', 1)[0]}://...")
        return value
