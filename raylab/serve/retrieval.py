"""Retrieval at serving time (`serve.rag`): the Embedder deployment, the checks `raylab serve`
makes of the index before deploying, and how a chat request becomes a retrieval-augmented one.

    serve:
      rag: {index: runs/acme/index, top_k: 4}      # default index: the config's index.directory

    args = rag_args(cfg)                  # exit 2: missing index, empty index, another embedder
    hits = await call(ingress.embedder, "retrieve", "question", 4, "hybrid", "acme")   # mode, caller's org
    messages, sources = await augment(ingress, messages, ext, org=None)   # the chat route's retrieval step

Organisations: `augment(..., org=...)` takes the caller's organisation and retrieval only sees
chunks it may read (raylab.rag.search: no org, its org, or an ACL naming it). The default,
None, is single-tenant mode: no identities, sources without `org`, and every chunk readable;
a chunk whose source names an org is then never retrieved for a caller without one.

Where embedding runs: in its own small deployment (`Embedder`, one torch thread per replica,
autoscaled from one to `serve.rag.max_replicas`), not in the ingress. The ingress is a single
replica holding every open stream on a tenth of a CPU; a /v1/embeddings call of 64 inputs is
about a CPU-second of MiniLM, which inside the ingress would stall every stream's next token
and could not scale or move to a GPU. The Embedder also holds the LanceDB table, so a chat
request makes one call (query in, chunks out) and the vector never crosses a process.
"""

from __future__ import annotations

import asyncio

from raylab import rag
from raylab.errors import UserError
from raylab.serve import openai_api as oa

SOURCE_FIELDS = ("chunk_id", "source", "origin", "record_id", "start", "end", "score", "text")


def rag_args(cfg, check: bool = True) -> dict | None:
    """The Embedder's arguments for `cfg.serve.rag`, after checking the index it names: a
    missing directory, an index with no chunks and one built with another embedding model or
    dimension than the config's `index.model` are exit 2, before anything is deployed.
    `check=False` (`raylab render --target serve`, `serve --emit-config`) takes them from the
    config alone: a rendered config is deployed later, often where the index is built after
    rendering, so the Embedder makes the same checks when its replica opens the index."""
    r = cfg.serve.rag
    if r is None:
        return None
    directory = r.index or rag.index_directory(cfg)
    if not check:
        return _configured(cfg, directory)
    key = "serve.rag.index" if r.index else "serve.rag.index (default index.directory)"
    try:
        manifest, table = rag.open_index(directory)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    # the model's own config files when it is a local directory: no model load at `raylab serve`
    name, dimensions, max_seq_length = rag.peek(cfg.index.model) or _loaded(cfg.index.model)
    if manifest.model != name or manifest.dimensions != dimensions:
        raise UserError(f"index.model: the index at {directory} ({key}) was built with {manifest.model} "
                        f"({manifest.dimensions} dimensions), not {name} ({dimensions}); its vectors would "
                        "not compare with the queries'. Set index.model to the index's model, or re-index")
    if r.search == "hybrid" and not rag.has_full_text(table):
        raise UserError(f"serve.rag.search: hybrid needs a full-text index, which the index at {directory} has not; "
                        "re-run `raylab index CONFIG` with index.hybrid: true (the default), or set serve.rag.search: "
                        "vector")
    stored = rag.vector_dimensions(table)
    if stored != manifest.dimensions:
        raise UserError(f"{key}: the table at {directory} holds {stored}-dimensional vectors, its manifest says "
                        f"{manifest.dimensions}; re-index into a new index.directory")
    max_tokens = min(r.max_input_tokens or max_seq_length, max_seq_length)
    if r.max_input_tokens and r.max_input_tokens > max_seq_length:
        raise UserError(f"serve.rag.max_input_tokens ({r.max_input_tokens}) is above what {name} reads "
                        f"({max_seq_length} tokens); it would truncate longer inputs silently")
    return {"index": directory, "model": manifest.model, "dimensions": manifest.dimensions,
            "by_default": r.by_default, "top_k": r.top_k, "search": r.search, "full_text": rag.has_full_text(table),
            "max_top_k": r.max_top_k, "nprobes": r.nprobes, "refine_factor": r.refine_factor,
            "max_inputs": r.max_inputs, "max_input_tokens": max_tokens, "threads": 1}


def _configured(cfg, directory: str) -> dict:
    """rag_args from the config alone (no index read): the model's name and dimensions from its
    config files, full-text search as index.hybrid builds it."""
    r = cfg.serve.rag
    name, dimensions, max_seq_length = rag.peek(cfg.index.model) or _loaded(cfg.index.model)
    if r.search == "hybrid" and not cfg.index.hybrid:
        raise UserError("serve.rag.search: hybrid needs the full-text index that index.hybrid: true builds; "
                        "set index.hybrid: true or serve.rag.search: vector")
    if r.max_input_tokens and r.max_input_tokens > max_seq_length:
        raise UserError(f"serve.rag.max_input_tokens ({r.max_input_tokens}) is above what {name} reads "
                        f"({max_seq_length} tokens); it would truncate longer inputs silently")
    return {"index": directory, "model": name, "dimensions": dimensions, "by_default": r.by_default, "top_k": r.top_k,
            "search": r.search, "full_text": cfg.index.hybrid, "max_top_k": r.max_top_k, "nprobes": r.nprobes,
            "refine_factor": r.refine_factor, "max_inputs": r.max_inputs,
            "max_input_tokens": min(r.max_input_tokens or max_seq_length, max_seq_length), "threads": 1}


def _loaded(model: str | None) -> tuple[str, int, int]:
    spec = rag.describe(model)
    return spec.name, spec.dimensions, spec.max_seq_length


def deployment_config(r) -> dict:
    """The Embedder's entry in the `serve deploy` config (`r`: the serve.rag section)."""
    return {"name": "Embedder", "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": r.cpus_per_replica},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": r.max_replicas, "target_ongoing_requests": 4,
                                   "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}}


class EmbedderImpl:
    """The Embedder deployment's code (the deployment is made in app.py, which imports Ray
    Serve; `raylab serve` imports this module to check the index without it). Also usable
    in-process: `IngressImpl` takes either its handle or an instance. One index and its
    embedding model per replica, loaded once."""

    def __init__(self, args: dict):
        import torch

        # One thread: a query is a few milliseconds of MiniLM, and more threads per replica
        # would contend with the Generator for the same cores; scale by replicas instead.
        torch.set_num_threads(int(args["threads"]))
        self.args = args
        self.index = rag.Index(args["index"], args["nprobes"], args["refine_factor"])
        made = int(self.index.model.get_embedding_dimension())
        if made != args["dimensions"]:  # `raylab serve` read the model's config files; the loaded model decides
            raise UserError(f"index.model: {args['model']} makes {made}-dimensional vectors, the index at "
                            f"{args['index']} holds {args['dimensions']}; re-index with this model")

    def retrieve(self, query: str, top_k: int, mode: str = "vector", org: str | None = None) -> list[dict]:
        """The top_k chunks `org` may read that best match `query` (mode: vector or hybrid),
        best first, as response sources."""
        return [{k: hit[k] for k in SOURCE_FIELDS} for hit in self.index.search(query, top_k, mode, org)]

    def embed(self, texts: list[str]) -> dict:
        """{"vectors": (n, d) float32, "tokens": n tokens} or {"error": ...} for an input
        longer than the configured limit (the model would truncate it silently)."""
        counts = self.index.tokens(texts)
        limit = self.args["max_input_tokens"]
        for i, n in enumerate(counts):
            if n > limit:
                return {"error": {"status": 400, "param": "input", "code": "context_length_exceeded",
                                  "message": f"input[{i}] has {n} tokens; {self.args['model']} takes at most {limit} "
                                             "(serve.rag.max_input_tokens)"}}
        return {"vectors": self.index.embed(texts), "tokens": sum(counts)}


async def call(embedder, method: str, *args):
    """A call to the Embedder: through its Serve handle, or (an in-process instance) in a
    thread, so the event loop keeps serving streams meanwhile."""
    if isinstance(embedder, EmbedderImpl):
        return await asyncio.to_thread(getattr(embedder, method), *args)
    return await getattr(embedder, method).remote(*args)


def _question(messages: list[dict]) -> int:
    """The index of the last user message: the question retrieval answers."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            if not messages[i]["content"].strip():
                raise oa.ApiError(400, "retrieval needs a non-empty last user message (or raylab.retrieval: false)",
                                  f"messages.{i}.content", "invalid_value")
            return i
    raise oa.ApiError(400, "retrieval needs a user message to search for (or raylab.retrieval: false)", "messages",
                      "invalid_value")


def top_k(rag_args_: dict | None, ext) -> int | None:
    """How many chunks this request retrieves, or None for no retrieval; ApiError(400) for an
    extension field this endpoint cannot honour. Retrieval happens when the request asks
    (`raylab.retrieval: true`, or `raylab.top_k` alone), else when `serve.rag.by_default`."""
    wanted = ext.retrieval if ext is not None else None
    asked_k = ext.top_k if ext is not None else None
    if rag_args_ is None:
        if wanted or asked_k is not None or (ext is not None and ext.search is not None):
            param = "raylab.retrieval" if wanted else "raylab.top_k" if asked_k is not None else "raylab.search"
            raise oa.ApiError(400, "this endpoint has no index attached (serve.rag is not set): retrieval is not "
                                   "available", param, "retrieval_unavailable")
        return None
    k = asked_k if asked_k is not None else rag_args_["top_k"]
    if k > rag_args_["max_top_k"]:
        raise oa.ApiError(400, f"raylab.top_k={k} exceeds the server's limit of {rag_args_['max_top_k']} "
                               "(serve.rag.max_top_k)", "raylab.top_k", "invalid_value")
    if wanted is None:
        wanted = asked_k is not None or rag_args_["by_default"]
    return k if wanted else None


def search_mode(rag_args_: dict, ext) -> str:
    """vector or hybrid: the request's `raylab.search`, else serve.rag.search; ApiError(400)
    for hybrid on an index without a full-text index."""
    mode = (ext.search if ext is not None else None) or rag_args_.get("search", "vector")
    if mode == "hybrid" and not rag_args_.get("full_text"):
        raise oa.ApiError(400, "raylab.search=hybrid needs a full-text index, which this endpoint's index has not "
                               "(built without index.hybrid)", "raylab.search", "invalid_value")
    return mode


async def augment(server, messages: list[dict], ext, org: str | None = None
                  ) -> tuple[list[dict], list[dict] | None]:
    """(messages, sources): the last user message rewritten with the retrieved chunks in the
    retrieval prompt RAFT trains on (raylab.rag.render_prompt), and the chunks as sources;
    (messages, None) unchanged when retrieval is off for this request. `org`: the caller's
    organisation (None: single-tenant mode, only chunks without an org)."""
    k = top_k(server.rag, ext)
    if k is None:
        return messages, None
    mode = search_mode(server.rag, ext)
    i = _question(messages)
    sources = await call(server.embedder, "retrieve", messages[i]["content"], k, mode, org)
    rewritten = [dict(m) for m in messages]
    rewritten[i]["content"] = rag.render_prompt(messages[i]["content"], sources)
    return rewritten, sources
