"""The fine-tuning service's files and jobs routes (serve/routers/files.py, fine_tuning.py) in
FastAPI's TestClient on a real SQLite control-plane database and real storage: OpenAI's
object shapes and error bodies, nothing kept after a refused request, org isolation (404),
roles (a viewer cannot create a job). No Ray: job submission goes to a closed port, so a
created job ends `failed` with `submission_failed` (the real path when no cluster answers).

    pytest tests/unit/serve/test_finetune_api.py
"""

from __future__ import annotations

import json
import os

import ftapi
import pytest
import yaml
from fastapi.testclient import TestClient
from ftapi import BASE, chat_jsonl, template

from raylab.core import audit

app_env = ftapi.app_env  # the fixture: the standalone app, its callers' headers, tmp_path


@pytest.fixture
def env(app_env):
    app, users, tmp_path = app_env
    return TestClient(app), users, tmp_path


def stored(tmp_path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), tmp_path / "files")
                  for d, _, names in os.walk(tmp_path / "files") for f in names)


def upload(client, headers, data: bytes, purpose: str = "fine-tune", name: str = "train.jsonl"):
    return client.post("/v1/files", headers=headers, data={"purpose": purpose},
                       files={"file": (name, data, "application/jsonl")})


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_files_round_trip_and_org_isolation(env):
    client, users, tmp_path = env
    made = upload(client, users["ada"], chat_jsonl(12))
    assert made.status_code == 200, made.text
    f = made.json()
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["bytes"] == len(chat_jsonl(12))
    assert stored(tmp_path) == [f"acme/{f['id']}"]

    assert client.get(f"/v1/files/{f['id']}", headers=users["vic"]).json() == f  # same org, a viewer reads
    assert client.get(f"/v1/files/{f['id']}/content", headers=users["ada"]).content == chat_jsonl(12)
    assert [x["id"] for x in client.get("/v1/files", headers=users["ada"]).json()["data"]] == [f["id"]]

    # Another organisation: exactly as if the file did not exist
    for method, path, who in (("get", "", "bob"), ("get", "/content", "bob"), ("delete", "", "dee")):
        other = getattr(client, method)(f"/v1/files/{f['id']}{path}", headers=users[who])
        missing = getattr(client, method)(f"/v1/files/file-nothing{path}", headers=users[who])
        assert other.status_code == missing.status_code == 404
        assert error_of(other)["code"] == "file_not_found"
    assert client.get("/v1/files", headers=users["bob"]).json()["data"] == []

    for who in ("vic", "ada"):  # a viewer and an ml_engineer may not delete (core/access/policy.py)
        assert client.delete(f"/v1/files/{f['id']}", headers=users[who]).status_code == 403
    assert client.delete(f"/v1/files/{f['id']}", headers=users["sam"]).json() == {
        "id": f["id"], "object": "file", "deleted": True}
    assert stored(tmp_path) == [] and client.get("/v1/files", headers=users["ada"]).json()["data"] == []
    assert client.get("/v1/files", headers={"Authorization": "Bearer rlk_nope"}).status_code == 401


@pytest.mark.parametrize("case", ["purpose", "malformed", "oversized", "not_objects"])
def test_refused_uploads_leave_nothing(env, case):
    client, users, tmp_path = env
    data, purpose = {"purpose": (chat_jsonl(12), "assistants"), "malformed": (chat_jsonl(3) + b"\n{not json", "fine-tune"),
                     "oversized": (chat_jsonl(60), "fine-tune"), "not_objects": (b"[1, 2]\n", "fine-tune")}[case]
    r = upload(client, users["ada"], data, purpose)
    assert r.status_code == (413 if case == "oversized" else 400), r.text
    assert error_of(r)["param"] == ("purpose" if case == "purpose" else "file")
    assert stored(tmp_path) == [] and client.get("/v1/files", headers=users["ada"]).json()["data"] == []
    # the control: the same client and key keep a good file
    assert upload(client, users["ada"], chat_jsonl(12)).status_code == 200 and len(stored(tmp_path)) == 1


def test_refused_jobs_leave_nothing(env):
    client, users, tmp_path = env
    good = upload(client, users["ada"], chat_jsonl(12)).json()["id"]
    few = upload(client, users["ada"], chat_jsonl(3)).json()["id"]
    dupes = upload(client, users["ada"], chat_jsonl(6) + b"\n" + chat_jsonl(6)).json()["id"]
    bad_turns = upload(client, users["ada"], b"\n".join(
        json.dumps({"messages": [{"role": "assistant", "content": f"x {i}"}]}).encode() for i in range(12))).json()["id"]
    before = stored(tmp_path)
    cases = [
        ({"model": BASE, "training_file": few}, "training_file", "3 valid, distinct examples; at least 10"),
        ({"model": BASE, "training_file": dupes}, "training_file", "6 duplicates"),
        ({"model": BASE, "training_file": bad_turns}, "training_file", "bad_turn_order"),
        ({"model": "gpt-4o-mini", "training_file": good}, "model", "not a base model"),
        ({"model": BASE, "training_file": good, "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": 0}}}}, "method.supervised.hyperparameters.n_epochs", "at least 1"),
        ({"model": BASE, "training_file": good, "method": {"type": "dpo"}}, "method.type", "not supported"),
        ({"model": BASE, "training_file": "file-nothing"}, "training_file", "no fine-tune file"),
        ({"model": BASE, "training_file": good, "learning_rate": 1}, "learning_rate", "Extra inputs"),
    ]
    for body, param, words in cases:
        r = client.post("/v1/fine_tuning/jobs", headers=users["ada"], json=body)
        assert r.status_code == 400, (body, r.text)
        error = error_of(r)
        assert error["param"] == param and words in error["message"], (body, error)
    assert client.get("/v1/fine_tuning/jobs", headers=users["ada"]).json() == {
        "object": "list", "data": [], "has_more": False}
    assert stored(tmp_path) == before  # no config, no result file
    # bob's org cannot use ada's file: the same answer as for no file at all
    r = client.post("/v1/fine_tuning/jobs", headers=users["bob"], json={"model": BASE, "training_file": good})
    assert r.status_code == 400 and error_of(r)["param"] == "training_file"


def test_a_viewer_cannot_create_a_job_and_the_refusal_is_audited(env):
    client, users, _ = env
    good = upload(client, users["ada"], chat_jsonl(12)).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=users["vic"], json={"model": BASE, "training_file": good})
    assert r.status_code == 403 and error_of(r)["code"] == "permission_denied"
    assert client.get("/v1/fine_tuning/jobs", headers=users["vic"]).json()["data"] == []
    denied = [e["fields"] for e in audit.entries(audit.Settings.from_env(), audit.Filter(kinds=("access.deny",)))]
    assert [(d["action"], d["rule"]) for d in denied] == [("jobs.create", "role")]
    # the control: an ml_engineer of the same org may
    assert client.post("/v1/fine_tuning/jobs", headers=users["ada"],
                       json={"model": BASE, "training_file": good}).status_code == 200


def test_a_job_keeps_its_config_pages_and_fails_when_no_cluster_answers(env):
    client, users, tmp_path = env
    good = upload(client, users["ada"], chat_jsonl(12)).json()["id"]
    made = []
    for seed in range(3):
        r = client.post("/v1/fine_tuning/jobs", headers=users["ada"], json={
            "model": BASE, "training_file": good, "suffix": "colours", "seed": seed, "metadata": {"team": "a"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 0.5, "lora_r": 4}}}})
        assert r.status_code == 200, r.text
        made.append(r.json())
    job = made[0]
    assert job["object"] == "fine_tuning.job" and job["status"] == "failed" and job["organization_id"] == "acme"
    assert job["error"]["code"] == "submission_failed" and "no Ray dashboard answers" in job["error"]["message"]
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 0.5}
    assert job["fine_tuned_model"] is None and job["metadata"] == {"team": "a"} and job["seed"] == 0

    generated = yaml.safe_load(client.get(f"/v1/files/{job['result_files'][0]}/content", headers=users["ada"]).content)
    assert generated["data"]["sources"][0]["path"] == str(tmp_path / "files" / "acme" / good)
    assert (generated["train"]["epochs"], generated["train"]["batch_size"], generated["train"]["lr"]) == (2, 3, 5e-4)
    assert generated["train"]["max_steps"] is None and generated["model"]["lora"]["r"] == 4
    assert generated["output_dir"] == str(tmp_path / "runs" / job["id"]) and generated["api"]["files"] is None

    events_ = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=users["ada"]).json()["data"]
    assert [e["level"] for e in events_] == ["error", "info", "info"]  # newest first
    assert events_[-1]["message"].startswith("Validating training file")

    page = client.get("/v1/fine_tuning/jobs?limit=2", headers=users["ada"]).json()
    assert [j["id"] for j in page["data"]] == [made[2]["id"], made[1]["id"]] and page["has_more"]
    rest = client.get(f"/v1/fine_tuning/jobs?limit=2&after={made[1]['id']}", headers=users["ada"]).json()
    assert [j["id"] for j in rest["data"]] == [made[0]["id"]] and not rest["has_more"]
    assert error_of(client.get("/v1/fine_tuning/jobs?limit=0", headers=users["ada"]))["param"] == "limit"

    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=users["bob"]).status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=users["vic"]).json()["id"] == job["id"]
    cancel = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=users["ada"])
    assert cancel.status_code == 400 and error_of(cancel)["code"] == "job_already_finished"  # a failed job stays failed
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=users["ada"]).json()["status"] == "failed"


def test_the_official_openai_client_uploads_and_creates_jobs(app_env):
    """The `openai` package against the app on a loopback uvicorn server: its request
    encodings (multipart, JSON, query pagination) and its parsing of our objects and errors."""
    import openai

    app, users, _ = app_env
    with ftapi.loopback(app) as url:
        key = users["ada"]["Authorization"].split()[1]
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)

        f = client.files.create(file=("train.jsonl", chat_jsonl(12)), purpose="fine-tune")
        assert f.id.startswith("file-") and f.bytes == len(chat_jsonl(12)) and f.status == "processed"
        assert client.files.content(f.id).content == chat_jsonl(12)
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("few.jsonl", b"{nope"), purpose="fine-tune")
        assert refused.value.body["param"] == "file"

        job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="colours",
                                             method={"type": "supervised", "supervised": {
                                                 "hyperparameters": {"n_epochs": 1}}})
        assert job.status == "failed" and job.error.code == "submission_failed"  # no cluster in a unit test
        assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
        assert [j.id for j in client.fine_tuning.jobs.list(limit=5)] == [job.id]
        assert [e.level for e in client.fine_tuning.jobs.list_events(job.id)][0] == "error"
        with pytest.raises(openai.BadRequestError) as bad:
            client.fine_tuning.jobs.create(model="no-such-base", training_file=f.id)
        assert bad.value.body["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=url, api_key=users["bob"]["Authorization"].split()[1],
                          max_retries=0).files.retrieve(f.id)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).files.list()


def test_the_inference_ingress_mounts_the_service_from_its_deploy_args(app_env):
    """`raylab serve` with api.enabled: deploy.api_args travels in the Serve app's args and
    the ingress rebuilds the service from it (the template config as YAML)."""
    from raylab.serve import deploy
    from raylab.serve.app import ROUTERS, IngressImpl, create_app

    _, users, tmp_path = app_env
    limits = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 2000, "max_batch_size": 4,
              "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2}
    assert deploy.api_args(template(tmp_path)) is None  # off by default: the routes answer 404 (test_app.py)
    args = deploy.api_args(template(tmp_path, enabled=True))
    ingress = IngressImpl(generator=None, args={"limits": limits, "api": args})
    assert ingress.ftapi.db == os.environ["RAYLAB_DATABASE_URL"] and ingress.ftapi.settings.max_file_bytes == 4000
    client = TestClient(create_app(ROUTERS, ingress))
    f = upload(client, users["ada"], chat_jsonl(12))
    assert f.status_code == 200 and stored(tmp_path) == [f"acme/{f.json()['id']}"]
    assert client.get(f"/v1/files/{f.json()['id']}", headers=users["bob"]).status_code == 404


def test_a_fine_tuned_model_name_routes_to_its_version_for_its_org_only(app_env):
    """The table from `ft:{base}:{org}:{suffix}:{job}` names to registry versions (registry
    names hold no colons), as the ingress's `route` reads it."""
    import asyncio

    from raylab.core.access import Principal
    from raylab.serve import deploy, ftstore
    from raylab.serve.app import IngressImpl

    _, _, tmp_path = app_env
    catalog = {"routes": {"m": "m/1", "m/1": "m/1", "m/2": "m/2"}, "listed": ["m", "m/1", "m/2"], "default": "m/1"}

    class Ingress(IngressImpl):
        def _catalog(self, default: str) -> dict:
            return catalog

    ingress = Ingress(generator=None, args={"limits": {}, "api": deploy.api_args(template(tmp_path, enabled=True))})
    ingress.reconfigure({"routes": {"m": "m/1", "m/1": "m/1"}, "listed": ["m", "m/1"], "default": "m/1"})
    name = "ft:preset:tiny-llama:acme:colours:ftjob-1"
    ftstore.add_model(ingress.ftapi.db, {"name": name, "org": "acme", "job_id": "ftjob-1", "registry_name": "m",
                                         "registry_version": 2})
    acme, globex = (Principal("ada", org, frozenset({"viewer"}), "api-key") for org in ("acme", "globex"))
    assert asyncio.run(ingress.route(name, acme)) == "m/2"  # registered after the deploy: looked up
    assert asyncio.run(ingress.route(name, None)) == "m/2"  # an endpoint without keys
    assert asyncio.run(ingress.route(name, globex)) is None  # another org: as if unknown
    assert asyncio.run(ingress.route(name.replace("ftjob-1", "ftjob-2"), acme)) is None


def test_a_succeeded_run_names_its_registered_version_and_stays_succeeded(app_env):
    """What `refresh` does when the Ray job SUCCEEDED: run.json (the pipeline's summary) names
    the version; the job gets its ft: name, the table maps it, and a later cancel is refused."""
    from raylab.core import runs, storage
    from raylab.serve import ftstore
    from raylab.serve.finetune import FineTuning

    app, users, tmp_path = app_env
    client = TestClient(app)
    good = upload(client, users["ada"], chat_jsonl(12)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=users["ada"],
                      json={"model": BASE, "training_file": good, "suffix": "colours"}).json()
    svc: FineTuning = app.state.ingress.ftapi
    assert job["status"] == "failed"  # no cluster; here the job is put back as if it had been queued
    ftstore.update_job(svc.db, job["id"], status="queued", error=None, finished_at=None)
    row = ftstore.get_job(svc.db, "acme", job["id"])
    storage.write_text(runs.Run(row["output_dir"]).summary, json.dumps({"version": {"name": "m", "version": "3"}}))
    svc.record_success(row)

    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=users["ada"]).json()
    name = f"ft:{BASE}:acme:colours:{job['id']}"
    assert done["status"] == "succeeded" and done["fine_tuned_model"] == name and done["finished_at"]
    assert svc.model_version(name, None) == "m/3"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=users["ada"]).status_code == 400
    svc.record_success(row)  # a second refresh changes nothing
    assert ftstore.get_job(svc.db, "acme", job["id"])["finished_at"] == done["finished_at"]


def test_pause_and_resume_states_refusals_and_the_kept_config(app_env):
    """Pause stops the Ray job and keeps `paused` through refreshes; resume submits the kept
    config again (here to a closed port: `submission_failed`, the real path with no cluster);
    a job in any other state is a 400 naming it, a viewer a 403, another org a 404."""
    from raylab.serve import ftstore

    app, users, _ = app_env
    client = TestClient(app)
    good = upload(client, users["ada"], chat_jsonl(12)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=users["ada"], json={"model": BASE, "training_file": good}).json()
    svc = app.state.ingress.ftapi
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    refused = client.post(f"{url}/pause", headers=users["ada"])  # failed (no cluster): nothing to pause
    assert refused.status_code == 400 and error_of(refused)["code"] == "job_not_running"
    ftstore.update_job(svc.db, job["id"], status="running", error=None, finished_at=None, ray_job_id="raysubmit_x")
    assert client.post(f"{url}/pause", headers=users["vic"]).status_code == 403  # a viewer
    assert client.post(f"{url}/pause", headers=users["bob"]).status_code == 404  # another org
    paused = client.post(f"{url}/pause", headers=users["ada"]).json()
    assert paused["status"] == "paused" and client.get(url, headers=users["ada"]).json()["status"] == "paused"
    messages = [e["message"] for e in client.get(f"{url}/events", headers=users["ada"]).json()["data"]]
    assert messages[0] == "Job paused; no checkpoint yet, it resumes from the start"
    again = client.post(f"{url}/pause", headers=users["ada"])
    assert again.status_code == 400 and error_of(again)["code"] == "job_not_running"
    resumed = client.post(f"{url}/resume", headers=users["ada"]).json()
    assert resumed["status"] == "failed" and resumed["error"]["code"] == "submission_failed"  # it was submitted
    messages = [e["message"] for e in client.get(f"{url}/events", headers=users["ada"]).json()["data"]]
    assert messages[1] == "Job resumed" and messages[0].startswith("the job could not be submitted")
    not_paused = client.post(f"{url}/resume", headers=users["ada"])
    assert not_paused.status_code == 400 and error_of(not_paused)["code"] == "job_not_paused"


def test_with_encryption_on_uploads_are_sealed_and_the_jobs_data_source_opens_them(tmp_path, monkeypatch):
    """governance.encryption: an upload is kept sealed (no example in its bytes), a job on it
    is validated and created (then fails: no cluster), and the data stage's JSONL reader opens
    the sealed file its config names into the same 12 records. The control: the same reader
    without the run's key is refused, naming the file, instead of parsing ciphertext."""
    from raylab import config
    from raylab.core import crypto
    from raylab.data.sources.files import JsonlDatasource, opened, source_root
    from raylab.errors import UserError

    sections = {"governance": {"encryption": {"enabled": True, "key_file": str(tmp_path / "keys" / "ring.json")}}}
    cfg = template(tmp_path, sections)
    monkeypatch.setenv(crypto.ENV, crypto.settings_of(cfg).to_env())  # what `raylab api CONFIG` sets
    app, users = ftapi.make_app(tmp_path, monkeypatch, cfg)
    client = TestClient(app)
    file_id = upload(client, users["ada"], chat_jsonl(12)).json()["id"]
    (kept,) = stored(tmp_path)
    raw = (tmp_path / "files" / kept).read_bytes()
    assert crypto.is_sealed(raw) and b"item number" not in raw
    job = client.post("/v1/fine_tuning/jobs", headers=users["ada"], json={"model": BASE, "training_file": file_id})
    assert job.status_code == 200 and job.json()["error"]["code"] == "submission_failed", job.text

    generated = config.load_dict(yaml.safe_load(
        client.get(f"/v1/files/{job.json()['result_files'][0]}/content", headers=users["ada"]).content))
    assert generated.governance.encryption.enabled  # the job's own run seals what it writes
    path = generated.data.sources[0].path

    def records() -> list[dict]:
        # the reader as Ray Data's read task drives it, built without its constructor (which
        # starts a Ray: the unit tier has none): open the file, then parse the stream
        reader = object.__new__(JsonlDatasource)
        reader.source, reader.root = "training_file", source_root(path)
        with opened(open(path, "rb"), lambda: open(path, "rb"), path) as f:
            return [r for block in reader._read_stream(f, path) for r in block.to_pylist()]

    rows = records()
    assert len(rows) == 12 and not any(r["error"] for r in rows)
    assert [json.loads(r["payload"])["messages"][0]["content"] for r in rows[:2]] == \
        ["What colour is item number 0?", "What colour is item number 1?"]
    monkeypatch.delenv(crypto.ENV)
    monkeypatch.setattr(crypto, "_deks", {})
    with pytest.raises(UserError, match=kept.rsplit("/", 1)[-1]):
        records()
