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
import urllib.parse

from raylab.cli.apiclient import KEY_ENV, URL_ENV, Api

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
