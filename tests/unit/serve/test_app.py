"""The ingress app assembled from routers (raylab/serve/app.py, routers/), through FastAPI's
TestClient without Ray: a registered extra router's route is served next to the health and
inference routes, which keep their API-key check and OpenAI-shaped errors; an unregistered
path is an OpenAI-shaped 404, and the extra route is not there when its router is not
registered. The routing table is looked up at request time: a version of the served model
registered after the deploy is routed, never-registered versions and other models are not."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from raylab.serve.app import ROUTERS, IngressImpl, create_app
from raylab.serve.routers import ingress

KEY = "sk-unit"
LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 2000, "max_batch_size": 4,
          "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2}
CATALOG = {"routes": {"m": "m/1", "m@production": "m/1", "m/1": "m/1"}, "listed": ["m", "m@production", "m/1"],
           "default": "m/1"}
EXPLAIN_PATHS = ("/v1/explain", "/v1/explain/{explanation_id}/html")  # answer 404 unless serve.explain (test_explain.py)
# the fine-tuning service's: 404 unless api.enabled (test_finetune_api.py)
FT_PATHS = ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs",
            "/v1/fine_tuning/jobs/{job_id}", "/v1/fine_tuning/jobs/{job_id}/cancel", "/v1/fine_tuning/jobs/{job_id}/events",
            "/v1/fine_tuning/jobs/{job_id}/pause", "/v1/fine_tuning/jobs/{job_id}/resume",
            "/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/registry/models/{name}/promote",
            "/v1/registry/models/{name}/rollback", "/v1/registry/deploy",
            "/v1/registry/load", "/v1/registry/unload")

extra = APIRouter()


@extra.get("/v1/extra")
async def extra_route(server=Depends(ingress)) -> dict:
    return {"served_by": type(server).__name__, "default": server.default}


class Ingress(IngressImpl):
    """The ingress with its registry look-up answered by `registered` (the catalog deploy.catalog
    would build now), counting the look-ups."""

    registered: dict = CATALOG
    lookups = 0

    def _catalog(self, default: str) -> dict:
        self.lookups += 1
        return self.registered


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", KEY)
    impl = Ingress(generator=None, args={"limits": LIMITS, "api_keys_env": "RAYLAB_UNIT_KEYS"})
    impl.reconfigure(CATALOG)
    return impl


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_a_registered_router_is_served_next_to_health_and_inference(server):
    client = TestClient(create_app([*ROUTERS, extra], server))
    assert client.get("/v1/extra").json() == {"served_by": "Ingress", "default": "m/1"}
    assert client.get("/healthz").json() == {"status": "ok", "model": "m/1", "canary": None}
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in listed["data"]] == CATALOG["listed"] and listed["data"][0]["root"] == "m/1"
    assert openai_error(client.get("/v1/models"), 401)["type"] == "authentication_error"
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        assert openai_error(client.post(path, json={"model": "m", **body}), 401)["code"] == "invalid_api_key"
        unknown = client.post(path, json={"model": "nope/7", **body}, headers={"Authorization": f"Bearer {KEY}"})
        assert openai_error(unknown, 404)["code"] == "model_not_found"
        assert openai_error(client.get(path), 405)["type"] == "invalid_request_error"


def test_unregistered_paths_and_routers_are_openai_shaped_404s(server):
    client = TestClient(create_app(ROUTERS, server))  # the extra router not registered
    for path in ("/v1/extra", "/v1/nothing-here"):
        error = openai_error(client.get(path), 404)
        assert error["type"] == "invalid_request_error"
    assert client.get("/healthz").status_code == 200
    assert set(create_app(ROUTERS, server).openapi()["paths"]) == {"/healthz", "/v1/models", "/v1/completions",
                                                                  "/v1/chat/completions", *EXPLAIN_PATHS, "/v1/embeddings",
                                                                  *FT_PATHS, "/v1/feedback"}
    assert server.ftapi is None and openai_error(client.get("/v1/files"), 404)  # mounted, off without api.enabled
    bare = TestClient(create_app([extra], server))  # only what is registered is served
    assert bare.get("/v1/extra").status_code == 200 and openai_error(bare.get("/healthz"), 404)


def test_the_ingress_builds_its_app_from_its_routers(server):
    app = server.__serve_build_asgi_app__()
    assert app.state.ingress is server
    assert set(app.openapi()["paths"]) == {"/healthz", "/v1/models", "/v1/completions", "/v1/chat/completions",
                                           *EXPLAIN_PATHS, "/v1/embeddings", *FT_PATHS, "/v1/feedback"}


def test_a_version_registered_after_the_deploy_is_routed_without_a_reconfigure(server):
    import asyncio

    client = TestClient(create_app(ROUTERS, server))
    auth = {"Authorization": f"Bearer {KEY}"}
    assert asyncio.run(server.route("m/2")) is None  # not registered yet: looked up, not found
    assert server.lookups == 1
    server.registered = {"routes": CATALOG["routes"] | {"m/2": "m/2", "m@staging": "m/2"},
                         "listed": CATALOG["listed"] + ["m@staging", "m/2"], "default": "m/1"}
    assert asyncio.run(server.route("m/2")) == "m/2"
    assert asyncio.run(server.route("m/9")) is None
    assert asyncio.run(server.route("other/2")) is None and asyncio.run(server.route("m@staging")) is None
    assert server.lookups == 3  # only the served model's NAME/N names are looked up; aliases stay as deployed
    assert asyncio.run(server.route("m/2")) == "m/2" and server.lookups == 3  # known now: no look-up
    listed = [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
    assert listed == CATALOG["listed"] + ["m/2"] and server.default == "m/1" and server.routes["m"] == "m/1"
    missing = client.post("/v1/completions", json={"model": "m/9", "prompt": "hi"}, headers=auth)
    assert openai_error(missing, 404)["code"] == "model_not_found"


def test_a_plain_model_is_routed_by_its_name_and_never_looked_up_in_a_registry(server, tiny_model_dir):
    import asyncio

    from raylab.serve import deploy

    name, local, table = deploy.plain_catalog(str(tiny_model_dir))
    assert (name, local) == (tiny_model_dir.name, str(tiny_model_dir))
    assert table == {"routes": {name: local}, "listed": [name], "default": local, "registry": False}
    server.reconfigure(table)
    assert asyncio.run(server.route(name)) == local
    assert asyncio.run(server.route(f"{tiny_model_dir.parent}/3")) is None  # shaped like NAME/N: still no look-up
    asyncio.run(server.refresh())
    assert server.lookups == 0
    client = TestClient(create_app(ROUTERS, server))
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [m["id"] for m in listed] == [name] and listed[0]["root"] == local


def test_serving_a_plain_model_needs_no_registry(tiny_model_dir, tmp_path, monkeypatch):
    """`raylab serve --model DIR --emit-config`: the app config names no tracking URI and
    preloads the directory itself; a path with no model is exit 2 before anything starts."""
    import yaml

    from conftest import cli_here

    home = tmp_path / "home"
    out = tmp_path / "serve.yaml"
    proc = cli_here("serve", "--model", str(tiny_model_dir), "--emit-config", str(out), env={"RAYLAB_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["args"]["tracking_uri"] is None and app["args"]["base"] is None
    generator, ingress_ = app["deployments"]
    assert generator["user_config"] == {"preload": [str(tiny_model_dir)]}
    assert ingress_["user_config"]["listed"] == [tiny_model_dir.name] and ingress_["user_config"]["registry"] is False
    assert not (home / "mlflow").exists()  # no registry was opened
    missing = cli_here("serve", "--model", str(tmp_path / "nope"), "--emit-config", str(tmp_path / "x.yaml"))
    assert missing.returncode == 2 and "no model directory there" in missing.stderr, missing.stderr
