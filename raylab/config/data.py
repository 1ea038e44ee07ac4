"""The `data:` section: sources, record rules, cleaning, PII, dedup, tokenization, packing."""

from __future__ import annotations

import importlib.util
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from raylab.config.types import Fraction, PathOrUri, PositiveInt, Section, StrList, invalid
from raylab.core import detectors

Format = Literal["completion", "instruction", "chat"]


class Fields(Section):
    """Where each part of a record lives in the source (field or column names)."""

    text: str = Field("text", description="completion text")
    prompt: str = Field("prompt", description="instruction prompt")
    response: str = Field("response", description="instruction response")
    system: str | None = Field(None, description="optional system message")
    context: str | None = Field(None, description="optional context appended to the prompt")
    messages: str = Field("messages", description="chat: OpenAI-style [{role, content}]")
    id: str | None = Field(None, description="a field holding a stable record id (a primary key)")


class _SourceBase(Section):
    name: str | None = Field(None, description="label in counts and quarantine; default source<N>")
    format: Format | None = Field(None, description="this source's record format; default data.format")
    fields: Fields | None = Field(None, description="this source's field names; default data.fields")
    org: str | None = Field(
        None, min_length=1, description="raylab index: the organisation whose callers may retrieve this source's "
        "chunks; default none: every caller may (single-tenant mode)")
    acl: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="raylab index: further organisations that may retrieve this source's chunks")
    contains_pii: bool = Field(
        False, description="this source's records are never sent off this machine: a remote train.provider does not "
        "receive them, even with governance.allow_remote (they still train a train.provider: ray run)")


class FileSource(_SourceBase):
    """jsonl/json/csv/parquet files, or `text`: a directory of .txt/.md documents (one per
    file, always completion format)."""

    type: Literal["jsonl", "json", "parquet", "csv", "text"] = Field(description="the file format")
    path: PathOrUri = Field(description="a file, a directory or a glob")


class SqlSource(_SourceBase):
    """Rows of a SQL query (SQLite, or PostgreSQL with the `postgres` extra)."""

    type: Literal["sql"] = Field(description="a SQL query's rows")
    url: str = Field(description="sqlite:///path/file.db, or ${env:NAME} holding a postgresql:// URL")
    query: str = Field(description="the SELECT whose rows are the records")


class HttpSource(_SourceBase):
    """A paginated JSON API: page numbers (`page_param`) or cursors (`cursor_param`)."""

    type: Literal["http"] = Field(description="a paginated JSON API")
    url: str = Field(description="the endpoint; query parameters for paging are added to it; may hold ${env:NAME} (a token, say)")
    records_path: str = Field("", description="dotted path to the record list in a response; '' = the body")
    page_param: str | None = Field(None, description="query parameter for the page number")
    start_page: int = Field(1, description="the first page number")
    cursor_param: str | None = Field(None, description="query parameter for the cursor")
    next_cursor_path: str | None = Field(None, description="dotted path to the next cursor in a response")
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP headers of each request; values may be ${env:NAME}")
    max_pages: PositiveInt = Field(10_000, description="stop after this many pages")
    retries: int = Field(3, ge=0, description="retries per page on connection errors, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    timeout_s: float = Field(30.0, gt=0, description="seconds a request may take; a timeout is retried")
    max_retry_wait_s: float = Field(60.0, ge=0, description="the longest wait before a retry, a server's Retry-After included")

    @model_validator(mode="after")
    def _paging(self) -> HttpSource:
        if self.page_param and self.cursor_param:
            raise invalid(f"give page_param or cursor_param, not both (page_param is {self.page_param!r}, "
                          f"cursor_param is {self.cursor_param!r})")
        if self.cursor_param and not self.next_cursor_path:
            raise invalid("required with cursor_param: the dotted path to the next cursor in a response",
                          at="next_cursor_path")
        return self


Source = Annotated[FileSource | SqlSource | HttpSource, Field(discriminator="type")]


class ValidationConfig(Section):
    """Rules every record must pass; a record that fails goes to the quarantine."""

    required: StrList = Field(default_factory=list, description="extra fields every record must have")
    min_chars: int = Field(1, ge=0, description="shorter records are rejected (too_short)")
    max_chars: PositiveInt = Field(200_000, description="longer records are rejected (too_long)")
    roles: StrList = Field(default_factory=lambda: ["system", "user", "assistant"],
                           description="chat roles a conversation may use")
    deny_regex: StrList = Field(default_factory=list, description="a record matching any is rejected")
    max_tokens: PositiveInt | None = Field(None, description="longer records (in tokens) are rejected or truncated (over_max_tokens); default data.max_seq_len")
    over_max_tokens: Literal["reject", "truncate"] = Field(
        "reject", description="what happens to a record over max_tokens")
    max_rejected_fraction: Fraction | None = Field(None, description="fail the stage above this")

    @model_validator(mode="after")
    def _compiles(self) -> ValidationConfig:
        for pattern in self.deny_regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise invalid(f"{pattern!r} is not a valid regular expression: {e}", at="deny_regex") from None
        if self.min_chars > self.max_chars:
            raise invalid(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class CleanConfig(Section):
    """Text normalisation applied before the rules are checked."""

    unicode: Literal["NFC", "NFKC"] | None = Field("NFC", description="Unicode normal form, or null to keep")
    whitespace: bool = Field(True, description="unify line ends, drop control and zero-width characters, trim")


class PiiConfig(Section):
    """Personal data and secrets replaced by typed placeholders (raylab/core/detectors.py)."""

    enabled: bool = Field(True, description="redact what the detectors find")
    types: StrList | None = Field(None, description="detectors to run; default all (raylab.core.detectors.available())")
    engine: Literal["builtin", "presidio"] = Field(
        "builtin", description="builtin: raylab's detectors; presidio: Microsoft Presidio's analyzer for the types it "
        "covers (pip install 'raylab[presidio]'; without a spaCy model it runs pattern recognisers only and finds no "
        "names), raylab's detectors for the rest")
    regions: StrList = Field(default_factory=lambda: list(detectors.DEFAULT_REGIONS),
                             description="countries (ISO 3166 alpha-2) whose national phone formats are recognised; "
                             "numbers written with +country code always are")
    pseudonymize: bool = Field(False, description="<PERSON_QZKD> instead of <PERSON>: the same value gets the same "
                               "letters within a run (a keyed hash; the key is drawn per run and never written)")

    @model_validator(mode="after")
    def _known(self) -> PiiConfig:
        if self.types is not None:
            unknown = [t for t in self.types if t not in detectors.available()]
            if unknown:
                raise invalid(f"unknown detectors {unknown}; expected some of {detectors.available()}", at="types")
        if self.enabled and self.engine == "presidio" and importlib.util.find_spec("presidio_analyzer") is None:
            raise invalid("presidio needs Presidio's analyzer, which is not installed: pip install 'raylab[presidio]'",
                          at="engine")
        bad = [r for r in self.regions if not detectors.valid_region(r)]
        if bad:
            raise invalid(f"unknown regions {bad}; expected ISO 3166 alpha-2 codes such as US, GB, DE", at="regions")
        return self

    @field_validator("regions")
    @classmethod
    def _upper(cls, regions: list[str]) -> list[str]:
        return [r.upper() for r in regions]


class DedupConfig(Section):
    """Exact and near-duplicate removal across the whole dataset (MinHash + LSH)."""

    exact: bool = Field(True, description="drop records whose normalised content is identical")
    near: bool = Field(True, description="drop records whose estimated Jaccard similarity reaches threshold")
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity for near duplicates")
    num_perm: PositiveInt = Field(64, description="MinHash permutations per signature")
    bands: PositiveInt = Field(16, description="LSH bands (num_perm must be a multiple)")
    ngram: PositiveInt = Field(5, description="character shingle length")
    shuffle_above: int = Field(20_000, ge=0, description="records above which duplicate groups are found by Ray Data "
                               "hash shuffles; at or below it the driver groups the signatures (a shuffle's fixed "
                               "cost dominates small data)")

    @model_validator(mode="after")
    def _bands(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise invalid(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DataConfig(Section):
    """`raylab data`: sources -> checked, cleaned, deduplicated, tokenized, packed shards."""

    sources: list[Source] = Field(min_length=1, description="at least one source")
    format: Format = Field("completion", description="completion | instruction | chat, for sources that do not say")
    fields: Fields = Field(default_factory=Fields, description="field names, for sources that do not say")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="record rules")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="text normalisation")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="personal data redaction")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="duplicate removal")
    max_seq_len: PositiveInt = Field(512, description="tokens per training sequence (packed or padded)")
    packing: Literal["pack", "pad"] = Field("pack", description="pack documents into sequences, or pad each")
    train_on_prompt: bool = Field(False, description="labels cover prompts too, not only responses")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of records held out (by record id)")
    seed: int = Field(0, description="seed of the train/val split")
    val_sources: StrList = Field(default_factory=list, description="names of sources held out whole as the val split "
                                 "(a fine-tuning job's validation file): never trained on, beside val_fraction's share")
    cpus_per_task: float = Field(0.25, gt=0, description="CPUs per Ray Data task")
    tokenizer_actors: PositiveInt = Field(2, description="most tokenizer actors at once")

    @model_validator(mode="after")
    def _val_sources_exist(self):
        names = [src.name or f"source{i}" for i, src in enumerate(self.sources)]
        unknown = [n for n in self.val_sources if n not in names]
        if unknown:
            raise invalid(f"val_sources names {', '.join(unknown)}, which no source is called; sources: {', '.join(names)}")
        if self.val_sources and len(set(self.val_sources)) == len(names):
            raise invalid("val_sources holds out every source: nothing would be left to train on")
        return self
