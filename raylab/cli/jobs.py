"""`raylab jobs`: the fine-tuning service's jobs from a shell, through its HTTP API with the
caller's key, so the service's roles and organisations hold (the CLI holds no database or
cluster credentials of its own).

    export RAYLAB_API_URL=http://127.0.0.1:8100 RAYLAB_API_KEY=rlk_...
    raylab jobs create train.jsonl --model preset:tiny-llama --suffix colours --n-epochs 2
    raylab jobs list
    raylab jobs events ftjob-...          # oldest first: phase changes and per-step metrics
    raylab jobs checkpoints ftjob-...
    raylab jobs cancel|pause|resume ftjob-...

`create` uploads the file (`POST /v1/files`, purpose fine-tune) and creates the job
(`POST /v1/fine_tuning/jobs`). A refusal from the service (a bad file, a role that may not, a
job in the wrong state) is exit 2 with the service's message; so are a missing
RAYLAB_API_URL or RAYLAB_API_KEY and a service that does not answer. The HTTP calls are the
standard library's: the `openai` client is not a dependency of the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid

from raylab.errors import UserError

URL_ENV, KEY_ENV = "RAYLAB_API_URL", "RAYLAB_API_KEY"
STATE_ACTIONS = ("cancel", "pause", "resume")


def add_parsers(sub) -> dict:
    """Add `raylab jobs ACTION`; return {verb: command}."""
    h = f"fine-tuning jobs through the service's API (${URL_ENV}, ${KEY_ENV}): create, list, events, checkpoints, " \
        "cancel, pause, resume"
    j = sub.add_parser("jobs", help=h, description=h)
    actions = j.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser("create", help="upload a chat JSONL file and start a fine-tuning job on it")
    c.add_argument("file", metavar="FILE", help="training examples: JSON lines of {\"messages\": [...]}")
    c.add_argument("--model", required=True, help="a base model the service fine-tunes (its api.base_models)")
    c.add_argument("--suffix", help="part of the fine-tuned model's name")
    c.add_argument("--validation-file", metavar="FILE", help="held-out examples, uploaded the same way")
    c.add_argument("--n-epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--learning-rate-multiplier", type=float)
    c.add_argument("--seed", type=int)
    ls = actions.add_parser("list", help="this organisation's jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    for name, help_ in (("events", "a job's events, oldest first"), ("checkpoints", "a job's kept checkpoints")):
        actions.add_parser(name, help=help_).add_argument("job_id", metavar="JOB_ID")
    for name in STATE_ACTIONS:
        actions.add_parser(name, help=f"{name} a job").add_argument("job_id", metavar="JOB_ID")
    for p in actions.choices.values():
        p.add_argument("--json", action="store_true", help="print the service's JSON")
    return {"jobs": cmd_jobs}


def cmd_jobs(args: argparse.Namespace) -> int:
    api = Api.from_env()
    out = ACTIONS[args.action](api, args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for line in render(args.action, out):
            print(line)
    return 0


class Api:
    """The service at RAYLAB_API_URL, called with RAYLAB_API_KEY."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url.rstrip("/"), key

    @classmethod
    def from_env(cls) -> Api:
        url, key = os.environ.get(URL_ENV), os.environ.get(KEY_ENV)
        if not url:
            raise UserError(f"{URL_ENV} is not set: the fine-tuning service's base URL (raylab api ... --standalone, "
                            "or an endpoint with api.enabled), e.g. http://127.0.0.1:8100")
        if not key:
            raise UserError(f"{KEY_ENV} is not set: a key from `raylab keys create --org ORG --role ml_engineer`")
        return cls(url, key)

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> dict:
        headers = {"Authorization": f"Bearer {self.key}"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise UserError(f"{method} {path}: {e.code} {_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"{URL_ENV}={self.url}: the service does not answer ({getattr(e, 'reason', e)})") from None

    def upload(self, path: str) -> dict:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from None
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{os.path.basename(path)}\"\r\nContent-Type: application/jsonl\r\n\r\n").encode() \
            + data + f"\r\n--{boundary}--\r\n".encode()
        return self.call("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return e.reason


def _create(api: Api, args) -> dict:
    hyper = {k: v for k, v in (("n_epochs", args.n_epochs), ("batch_size", args.batch_size),
                               ("learning_rate_multiplier", args.learning_rate_multiplier)) if v is not None}
    body = {"model": args.model, "training_file": api.upload(args.file)["id"]}
    if args.validation_file:
        body["validation_file"] = api.upload(args.validation_file)["id"]
    body |= {k: v for k, v in (("suffix", args.suffix), ("seed", args.seed)) if v is not None}
    if hyper:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    return api.call("POST", "/v1/fine_tuning/jobs", json.dumps(body).encode())


def _pages(api: Api, path: str) -> list[dict]:
    """Every item of a paginated list (`after`/`has_more`), in the service's order."""
    items, after = [], None
    while True:
        query = urllib.parse.urlencode({"limit": 100, **({"after": after} if after else {})})
        page = api.call("GET", f"{path}?{query}")
        items += page["data"]
        if not page.get("has_more") or not page["data"]:
            return items
        after = page["data"][-1]["id"]


def _job_path(job_id: str) -> str:
    return f"/v1/fine_tuning/jobs/{urllib.parse.quote(job_id, safe='')}"


ACTIONS = {
    "create": _create,
    "list": lambda api, a: api.call("GET", f"/v1/fine_tuning/jobs?limit={a.limit}"),
    "events": lambda api, a: {"data": list(reversed(_pages(api, _job_path(a.job_id) + "/events")))},
    "checkpoints": lambda api, a: {"data": _pages(api, _job_path(a.job_id) + "/checkpoints")},
    **{name: (lambda api, a, n=name: api.call("POST", f"{_job_path(a.job_id)}/{n}")) for name in STATE_ACTIONS},
}


def render(action: str, out: dict) -> list[str]:
    if action == "events":
        return [f"{e['created_at']}  {e['level']:<5}  {e['message']}" for e in out["data"]]
    if action == "checkpoints":
        return [f"{c['id']}  step {c['step_number']}  {_metrics(c['metrics'])}" for c in out["data"]]
    jobs = out["data"] if action == "list" else [out]
    return [f"{j['id']}  {j['status']:<16}  {j['model']}  {j['fine_tuned_model'] or '-'}"
            + (f"  error: {j['error']['message']}" if j.get("error") else "") for j in jobs]


def _metrics(m: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items() if k != "step")
