"""The data stage (`raylab data`): sources -> validated, redacted, deduplicated, packed shards.

    from raylab.data import run_data
    manifest = run_data(cfg)          # writes <output_dir>/data/ (see stage.py)
    docs, counts = clean_documents(cfg.data)   # the same checks, documents only (raylab index)
    encode_documents(tok, texts, messages_json, train_on_prompt)  # the stage's tokenization: [(ids, labels)]

Modules: stage (the Ray Data pipeline, `run_data`), sources/ (files, sql, http), records
(one record's rules), documents (checked documents for other stages), dedup (MinHash +
LSH), packing (tokenization and the trainer contract), stats (counts and token statistics),
datasheet (the data run's datasheet, beside the manifest), chatfile (an uploaded chat JSONL
checked by the same rules: the fine-tuning service's validation).
"""

from __future__ import annotations

from raylab.data.chatfile import ChatFileError, check_chat_file, parse_jsonl
from raylab.data.dedup import minhash
from raylab.data.documents import clean_documents, document_text
from raylab.data.packing import encode_batch as encode_documents
from raylab.data.sources import FILE_DATASOURCES, describe_inputs, listing, source_name
from raylab.data.stage import run_data


def extensions(source_type: str) -> list[str]:
    """The file extensions a file source of `source_type` reads (empty: any)."""
    return list(FILE_DATASOURCES[source_type]._FILE_EXTENSIONS or [])


__all__ = ["ChatFileError", "check_chat_file", "parse_jsonl", "clean_documents", "describe_inputs", "document_text", "encode_documents", "extensions", "listing", "minhash", "run_data",
           "source_name"]
