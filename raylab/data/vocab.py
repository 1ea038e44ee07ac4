"""The corpus tokenizer (`pretrain.tokenizer`): trained by the data stage between dedup and
tokenization, on the train split of what it accepted, so on redacted text only.

    pretrain: {tokenizer: {vocab_size: 2048}}    # in the config; then `raylab data CONFIG`
    <output_dir>/data/tokenizer/                 # a transformers fast tokenizer (from_pretrained)

Why here and not in the pretrain stage: the data stage tokenizes with the base model's
tokenizer, so the tokenizer must exist before its tokenize step; training it inside the stage
from the records it has just redacted and deduplicated keeps one pass over the sources, gives
raw text no path into the vocabulary, and ties the tokenizer to the same cache key as the
shards it tokenized (the manifest records its fingerprint; the pretrain stage then builds the
preset around it). The validation split is left out, so held-out answers shape no merge.
"""

from __future__ import annotations

import json
import logging

from raylab import models
from raylab.config import ModelConfig, RaylabConfig
from raylab.core import runs, storage
from raylab.data import packing
from raylab.errors import UserError

log = logging.getLogger(__name__)


def document_text(text: str, messages: str) -> str:
    """What the tokenizer learns from one record: a completion's text, or every turn of a
    conversation as `role` then content (the words the chat template renders around them)."""
    if not messages:
        return text
    return "\n".join(f"{m['role']}\n{m['content']}" for m in json.loads(messages))


def corpus_texts(docs, seed: int, val_fraction: float, val_sources: list[str] = ()) -> list[str]:
    """The train split's documents (DOC_COLUMNS rows of a Ray dataset), in record-id order: the
    same corpus gives the same list whatever order Ray Data delivered the blocks in."""
    rows = []
    for batch in docs.select_columns(["source", "record_id", "text", "messages"]).iter_batches(batch_format="pyarrow"):
        for r in batch.to_pylist():
            if not packing.in_val(r["record_id"], seed, val_fraction, r["source"], val_sources):
                rows.append((r["record_id"], document_text(r["text"], r["messages"])))
    return [text for _, text in sorted(rows)]


def check(cfg: RaylabConfig) -> None:
    """Fails before any work when the tokenizer could not be loaded by every process."""
    if not runs.Run(cfg.output_dir).is_local:  # the Tokenize actors load it with from_pretrained, from a path
        raise UserError(f"pretrain.tokenizer: output_dir {cfg.output_dir} is not a filesystem path; the corpus tokenizer "
                        "is loaded from <output_dir>/data/tokenizer, so use a local path or a shared mount, or remove "
                        "pretrain.tokenizer")


def train(cfg: RaylabConfig, docs) -> ModelConfig:
    """Train the corpus tokenizer on `docs` (accepted, redacted, deduplicated), save it under
    data/tokenizer/, and return the model section that loads it (for the Tokenize actors)."""
    spec, run = cfg.pretrain.tokenizer, runs.Run(cfg.output_dir)
    texts = corpus_texts(docs, cfg.data.seed, cfg.data.val_fraction, cfg.data.val_sources)
    if not texts:
        raise UserError("pretrain.tokenizer: the train split holds no accepted document to train a tokenizer on; "
                        "check data.sources and data.val_fraction")
    tok = models.train_corpus_tokenizer(texts, spec.vocab_size, spec.min_frequency)
    storage.reset_dir(run.tokenizer)
    storage.save_pretrained(tok, run.tokenizer)
    log.info(f"data: trained a {len(tok)}-token BPE tokenizer on {len(texts):,} redacted train documents -> {run.tokenizer}")
    return cfg.model.model_copy(update={"name_or_path": run.tokenizer})
