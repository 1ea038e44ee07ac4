"""`POST /v1/explain` and `GET /v1/explain/{id}/html` (raylab/serve/routers/explain.py,
explainer.py) through FastAPI's TestClient without Ray: the ingress's routes with the
Explainer's own code answering in this process on a tiny model (a plain model directory, no
registry). Shapes of every method's answer (SHAP and spans too), the HTML view of a recent one (escaped; gone once
evicted or expired), every bad request an OpenAI-shaped 4xx naming its field, a missing
captum or shap a 400 naming the extra, and an endpoint without `serve.explain` neither deploying the
Explainer nor serving the route."""

from __future__ import annotations

import sys

import pytest
from fastapi.testclient import TestClient

from raylab import config, models
from raylab.errors import UserError
from raylab.serve import deploy
from raylab.serve.app import ROUTERS, IngressImpl, create_app
from raylab.serve.explainer import ExplainerBase
from raylab.serve.routers.explain import Recent

pytest.importorskip("captum")

KEY = "sk-unit"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 4000, "max_batch_size": 4,
          "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2}


def settings(**serve_explain) -> dict:
    """The `explain` args deploy.py writes, from a config (the ingress and Explainer read them)."""
    s = config.ServeConfig(explain={"enabled": True, "max_n_steps": 16, "max_samples": 4, "max_evals": 64,
                                    **serve_explain})
    ex = config.ExplainConfig(max_prompt_tokens=48, max_target_tokens=4, n_steps=8, samples=2, evals=32)
    return deploy.explainer_config(s, ex)[0]


class Explainer(ExplainerBase):
    """The Explainer's code in this process; a version is loaded once (Serve's multiplexed LRU
    is what the deployment adds)."""

    def __init__(self, args: dict):
        super().__init__(args)
        self.loaded: dict = {}

    async def get_model(self, version: str):
        if version not in self.loaded:
            self.loaded[version] = await self._load(version)
        return self.loaded[version]


class Ingress(IngressImpl):
    """The ingress with its Explainer handle replaced by the Explainer's code in this process."""

    async def explain(self, version: str, job: dict) -> dict:
        return await self.explainer.answer(version, job)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the Explainer sets one thread, as its replicas run


@pytest.fixture(scope="module")
def served(tiny_model_dir, one_thread):
    """(client, served name, version dir) of an ingress serving the tiny model with explanations on."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYLAB_UNIT_KEYS", KEY)
    name, local, table = deploy.plain_catalog(str(tiny_model_dir))
    args = {"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_KEYS", "tracking_uri": None,
            "explain": settings(keep_results=2)}
    server = Ingress(generator=None, args=args, explainer=Explainer(args))
    server.reconfigure(table)
    yield TestClient(create_app(ROUTERS, server)), name, local
    mp.undo()


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_every_method_answers_with_its_matrix_and_a_recent_one_has_an_html_view(served, tiny_model_dir):
    client, name, local = served
    tok = models.load_saved_tokenizer(str(tiny_model_dir))
    got = client.post("/v1/explain", headers=AUTH, json={"model": name, "prompt": "a <b> & c", "target": "ok!",
                                                          "method": "integrated_gradients", "n_steps": 8})
    assert got.status_code == 200, got.text
    ig = got.json()
    assert ig["object"] == "explanation" and ig["id"].startswith("explain-") and ig["version"] == local
    assert ig["input_ids"] == models.prompt_ids(tok, {"text": "a <b> & c"})  # plain text: no chat template
    assert ig["output_ids"] == tok("ok!", add_special_tokens=False)["input_ids"] and ig["output_text"] == "ok!"
    assert ig["target_source"] == "given" and ig["parameters"]["n_steps"] == 8 and ig["seconds"] > 0
    assert len(ig["attributions"]) == len(ig["output_tokens"]) == len(ig["convergence_deltas"]) == 3
    assert all(len(row) == len(ig["input_tokens"]) == len(ig["input_ids"]) for row in ig["attributions"])
    assert ig["input_totals"] == pytest.approx([sum(c) for c in zip(*ig["attributions"], strict=True)])

    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    fa = client.post("/v1/explain", headers=AUTH, json={"model": name, "messages": messages, "target": "no",
                                                         "method": "feature_ablation"}).json()
    chat = models.prompt_ids(tok, {"messages": [{"role": "system", "content": "Be brief."}, messages[1]]})
    assert fa["method"] == "feature_ablation" and fa["input_ids"] == chat  # the chat template, as serving renders it
    assert "convergence_deltas" not in fa and "n_steps" not in fa["parameters"]  # integrated gradients' only
    assert len(fa["attributions"]) == 2 and all(len(row) == len(chat) for row in fa["attributions"])

    page = client.get(ig["html"], headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<b>" not in page.text and "&lt;" in page.text and "&amp;" in page.text  # escaped, never raw
    assert page.text.count('class="t"') == len(ig["input_tokens"]) * (1 + len(ig["output_tokens"]))
    assert openai_error(client.get(ig["html"]), 401)["code"] == "invalid_api_key"

    # the defaults (explain.method, n_steps; the model's own greedy answer), and a third
    # explanation: with keep_results=2 the oldest one's view is gone, the newest two stay
    greedy = client.post("/v1/explain", headers=AUTH, json={"model": name, "prompt": "hello there"})
    assert greedy.status_code == 200, greedy.text
    greedy = greedy.json()
    assert greedy["target_source"] == "greedy answer" and 1 <= len(greedy["output_ids"]) <= 4
    assert greedy["method"] == "integrated_gradients" and greedy["parameters"]["n_steps"] == 8
    assert openai_error(client.get(ig["html"], headers=AUTH), 404)["code"] == "explanation_not_found"
    assert client.get(fa["html"], headers=AUTH).status_code == 200
    assert client.get(greedy["html"], headers=AUTH).status_code == 200
    assert openai_error(client.get("/v1/explain/explain-nope/html", headers=AUTH), 404)["param"] == "id"


BAD = [  # (what, body without "model", status, param, code or None, words the message holds)
    ("empty prompt", {"prompt": "  "}, 400, "prompt", "invalid_value", "'prompt' is empty"),
    ("neither prompt nor messages", {"target": "x"}, 400, "prompt", "invalid_value", "give one of"),
    ("both", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "prompt", "invalid_value", "not both"),
    ("empty messages", {"messages": []}, 400, "messages", "invalid_value", "messages"),
    ("empty target", {"prompt": "a", "target": ""}, 400, "target", "invalid_value", "'target' is empty"),
    ("target too long", {"prompt": "a", "target": "abcde"}, 400, "target", "context_length_exceeded",
     "explain.max_target_tokens"),
    ("prompt too long", {"prompt": "word " * 12}, 400, "prompt", "context_length_exceeded", "explain.max_prompt_tokens"),
    ("unknown method", {"prompt": "a", "method": "lime"}, 400, "method", "invalid_value", "integrated_gradients"),
    ("n_steps over the limit", {"prompt": "a", "n_steps": 17}, 400, "n_steps", "invalid_value",
     "serve.explain.max_n_steps"),
    ("samples for another method", {"prompt": "a", "method": "feature_ablation", "samples": 2}, 400, "samples",
     "invalid_value", "shapley_sampling only"),
    ("unknown argument", {"prompt": "a", "temperature": 0}, 400, "temperature", None, "Unrecognized"),
    ("unknown baseline", {"prompt": "a", "baseline": "zero"}, 400, "baseline", "invalid_value", "baseline"),
    ("evals for another method", {"prompt": "a", "evals": 8}, 400, "evals", "invalid_value", "shap only"),
    ("evals over the limit", {"prompt": "a", "method": "shap", "evals": 65}, 400, "evals", "invalid_value",
     "serve.explain.max_evals"),
    ("spans for a token method", {"prompt": "a b", "method": "integrated_gradients", "spans": [[0, 1]]}, 400, "spans",
     "invalid_value", "feature_ablation and shapley_sampling only"),
    ("sentences for shap", {"prompt": "a. b", "method": "shap", "granularity": "sentence"}, 400, "granularity",
     "invalid_value", "attributes to tokens"),
    ("spans and sentences", {"prompt": "a. b", "method": "feature_ablation", "spans": [[0, 1]],
                             "granularity": "sentence"}, 400, "spans", "invalid_value", "not both"),
    ("span outside the prompt", {"prompt": "a b", "method": "feature_ablation", "spans": [[0, 1], [2, 9]]}, 400,
     "spans", "invalid_value", "spans[1]: [2, 9]"),
    ("overlapping spans", {"prompt": "a b c", "method": "feature_ablation", "spans": [[0, 3], [2, 5]]}, 400,
     "spans", "invalid_value", "overlap"),
    ("a span that is not a pair", {"prompt": "a b", "method": "feature_ablation", "spans": [[0, 1, 2]]}, 400,
     "spans.0", "invalid_value", "at most 2 items"),
    ("no sentence", {"prompt": " . ", "method": "feature_ablation", "granularity": "sentence"}, 400, "granularity",
     "invalid_value", ""),
]


@pytest.mark.parametrize("what,body,status,param,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_4xx_naming_the_field(served, what, body, status, param, code, words):
    client, name, _ = served
    error = openai_error(client.post("/v1/explain", headers=AUTH, json={"model": name, **body}), status)
    assert (error["param"], error["code"]) == (param, code) and words in error["message"], error


def test_shap_and_spans_answer_in_the_same_shape(served):
    client, name, _ = served
    got = client.post("/v1/explain", headers=AUTH, json={"model": name, "prompt": "a <b> & c", "target": "ok",
                                                          "method": "shap", "evals": 16})
    assert got.status_code == 200, got.text
    sv = got.json()
    assert sv["method"] == "shap" and sv["parameters"]["evals"] == 16 and "log odds" in sv["target_log_prob"]
    assert len(sv["attributions"]) == len(sv["output_tokens"]) == len(sv["base_values"]) == 2
    assert all(len(row) == len(sv["input_tokens"]) for row in sv["attributions"])
    assert client.get(sv["html"], headers=AUTH).status_code == 200

    prompt = "Reset it. Then log in."
    sentences = client.post("/v1/explain", headers=AUTH, json={"model": name, "prompt": prompt, "target": "ok",
                                                                "method": "shapley_sampling", "samples": 2,
                                                                "granularity": "sentence"}).json()
    assert [s["text"] for s in sentences["input_spans"]] == ["Reset it.", "Then log in."]
    assert all(len(row) == 2 for row in sentences["attributions"]) and len(sentences["input_totals"]) == 2
    assert sentences["parameters"]["features"] == "spans" and len(sentences["input_tokens"]) > 2  # tokens still told
    messages = [{"role": "user", "content": prompt}]
    given = client.post("/v1/explain", headers=AUTH, json={"model": name, "messages": messages, "target": "ok",
                                                            "method": "feature_ablation", "spans": [[10, 22]]}).json()
    assert [s["text"] for s in given["input_spans"]] == ["Then log in."] and len(given["attributions"][0]) == 1
    page = client.get(given["html"], headers=AUTH).text
    assert page.count('class="t"') == 1 + len(given["output_tokens"])  # one coloured cell per span and row


def test_unknown_model_no_key_and_a_missing_captum(served):
    client, name, _ = served
    unknown = client.post("/v1/explain", headers=AUTH, json={"model": "nope/7", "prompt": "a"})
    assert openai_error(unknown, 404)["code"] == "model_not_found"
    assert openai_error(client.post("/v1/explain", json={"model": name, "prompt": "a"}), 401)["code"] == "invalid_api_key"
    body = {"model": name, "prompt": "a", "target": "b", "method": "feature_ablation"}
    assert client.post("/v1/explain", headers=AUTH, json=body).status_code == 200  # the control: installed
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "captum.attr", None)  # as if the extra were not installed
        error = openai_error(client.post("/v1/explain", headers=AUTH, json=body), 400)
    assert error["param"] == "method" and error["code"] == "method_not_installed"
    assert "pip install 'raylab[explain]'" in error["message"]
    shap = body | {"method": "shap", "evals": 8}
    assert client.post("/v1/explain", headers=AUTH, json=shap).status_code == 200  # the control: installed
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "shap", None)
        error = openai_error(client.post("/v1/explain", headers=AUTH, json=shap), 400)
    assert error["param"] == "method" and error["code"] == "method_not_installed"
    assert "needs shap" in error["message"] and "Python 3.12" in error["message"]


def test_without_serve_explain_there_is_no_explainer_and_no_route(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", KEY)
    server = IngressImpl(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_KEYS"})
    server.reconfigure(deploy.plain_catalog(str(tiny_model_dir))[2])
    client = TestClient(create_app(ROUTERS, server))
    off = openai_error(client.post("/v1/explain", headers=AUTH, json={"model": "x", "prompt": "a"}), 404)
    assert off["code"] == "explain_not_enabled" and "serve.explain.enabled" in off["message"]
    assert openai_error(client.get("/v1/explain/explain-1/html", headers=AUTH), 404)["code"] == "explain_not_enabled"

    plain = deploy.app_config(config.ServeConfig(), None, str(tiny_model_dir))
    assert [d["name"] for d in plain["deployments"]] == ["Generator", "Ingress"] and "explain" not in plain["args"]
    on = config.ServeConfig(explain={"enabled": True, "min_replicas": 0, "max_replicas": 3, "cpus_per_replica": 0.5})
    app = deploy.app_config(on, None, str(tiny_model_dir), ex=config.ExplainConfig(max_target_tokens=7))
    explainer = app["deployments"][2]
    assert explainer["name"] == "Explainer" and explainer["max_ongoing_requests"] == 1
    assert explainer["max_queued_requests"] == 8 and explainer["ray_actor_options"] == {"num_cpus": 0.5}
    assert (explainer["autoscaling_config"]["min_replicas"], explainer["autoscaling_config"]["max_replicas"]) == (0, 3)
    assert app["args"]["explain"]["limits"]["max_target_tokens"] == 7
    with pytest.raises(UserError, match=r"explain.n_steps \(300\) is above serve.explain.max_n_steps \(256\)"):
        deploy.app_config(on, None, str(tiny_model_dir), ex=config.ExplainConfig(n_steps=300))
    with pytest.raises(config.ConfigError, match=r"serve.explain.gpus"):
        config.load_dict({"version": 1, "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
                          "model": {"name_or_path": "preset:tiny-llama"}, "serve": {"explain": {"gpus": 1}}})


def test_recent_explanations_are_bounded_in_number_and_age():
    now = [0.0]
    recent = Recent(keep=2, seconds=10, clock=lambda: now[0])
    for key in "abc":
        recent.put(key, {"id": key})
    assert recent.get("a") is None and recent.get("b") == {"id": "b"} and recent.get("c") == {"id": "c"}
    now[0] = 10.0
    assert recent.get("b") == {"id": "b"}  # at its age limit: still there
    now[0] = 10.5
    assert recent.get("b") is None and recent.get("c") is None  # expired
    recent.put("d", {"id": "d"})
    assert list(recent._items) == ["d"]  # the expired ones are dropped, not only hidden
