"""`train.provider: openai_compatible`: fine-tuning at an OpenAI-compatible service.

    raylab train configs/remote.yaml      # after `raylab data`; or `raylab run` (data first)

The data stage runs here, with every check, redaction and dedup; what leaves this machine is
its accepted records, the train split as the training file and the val split as the
validation file (`train.remote.validation`), as chat JSONL, without the records of any source
marked `contains_pii: true`. The config must say `governance.allow_remote: true` (config.root).

Then: upload both files, create the job, follow it (its events become log lines and its
`metrics` events rows of train/metrics.jsonl, so MLflow shows the curves), and register the
result as a *remote version*: an MLflow model version whose artifact is a pointer
(train/final/remote.json: the provider, the fine-tuned model's name, the job, what was sent
and its sha256), tagged `raylab.provider`, with a model card. The gates judge it on the
provider's reported validation loss (evaluate/gates.py); raylab does not serve it (its
weights stay at the provider).

The job's state is kept in train/remote_job.json as each step happens, so running the same
command again follows the job already created instead of sending the data twice; Ctrl-C
leaves the job running at the provider. Uploads and the job are audited
(`train.remote_upload`, `train.remote_job`).

The client is the official `openai` package (multipart uploads, retries with backoff on 429
and 5xx, its error types), installed with the `remote` extra.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import time
import uuid

from raylab import config
from raylab.config import RaylabConfig
from raylab.core import events, runs, storage
from raylab.core.secrets import expand_env, redact_url
from raylab.errors import RunFailed, UserError

log = logging.getLogger("raylab.train")

DONE = ("succeeded", "failed", "cancelled")
INSTALL = "pip install 'raylab[remote]'"


def examples(cfg: RaylabConfig, manifest: runs.DataManifest) -> dict:
    """{train, val}: the chat JSONL bytes of each split's accepted records, and the counts
    (sent per split, withheld per contains_pii source)."""
    withheld_sources = {s.name or f"source{i}" for i, s in enumerate(cfg.data.sources) if s.contains_pii}
    table = storage.read_table(manifest.outputs["records"], columns=["source", "messages", "split"])
    lines: dict[str, list[str]] = {"train": [], "val": []}
    withheld: dict[str, int] = {}
    for row in table.to_pylist():
        if row["source"] in withheld_sources:
            withheld[row["source"]] = withheld.get(row["source"], 0) + 1
        elif row["split"] in lines and row["messages"]:
            lines[row["split"]].append(json.dumps({"messages": json.loads(row["messages"])}, ensure_ascii=False))
    if not lines["train"]:
        raise UserError("train.provider openai_compatible: no train-split record may be sent"
                        + (f" (every one comes from a source marked contains_pii: {sorted(withheld)})" if withheld else "")
                        + "; add a source without contains_pii, or train with train.provider: ray")
    return {"train": "\n".join(lines["train"]).encode() + b"\n",
            "val": "\n".join(lines["val"]).encode() + b"\n" if lines["val"] else None,
            "counts": {"train": len(lines["train"]), "val": len(lines["val"]), "withheld": withheld}}


def where(cfg: RaylabConfig) -> str:
    """The provider's URL as logs, tags and the card may show it (credentials redacted)."""
    return redact_url(expand_env(cfg.train.remote.base_url, "train.remote.base_url"))


def client(cfg: RaylabConfig):
    try:
        import openai
    except ImportError:
        raise UserError(f"train.provider openai_compatible needs the openai package: {INSTALL}") from None
    r = cfg.train.remote
    return openai.OpenAI(base_url=expand_env(r.base_url, "train.remote.base_url"),
                         api_key=expand_env(r.api_key, "train.remote.api_key"),
                         timeout=r.request_timeout_s, max_retries=r.max_retries)


def _refused(e: Exception, what: str, cfg: RaylabConfig) -> Exception:
    """The provider's refusal as the user's error (exit 2), naming the setting to fix."""
    import openai

    url, kept = where(cfg), runs.Run(cfg.output_dir).train_remote_job
    if isinstance(e, openai.AuthenticationError):
        return UserError(f"train.remote.api_key: {url} refused the key (401) while {what}")
    if isinstance(e, openai.APIStatusError) and (e.status_code == 429 or e.status_code >= 500):
        return RunFailed(f"{url} failed {what} ({e.status_code}) after train.remote.max_retries retries: "
                         f"{_message(e)}; the job's state is kept in {kept}, so the same command continues")
    if isinstance(e, openai.APIStatusError):
        return UserError(f"{url} refused {what} ({e.status_code}): {_message(e)}; check train.remote "
                         "(model, hyper-parameters) and the data stage's records")
    if isinstance(e, openai.APIConnectionError):
        return RunFailed(f"train.remote.base_url: {url} did not answer while {what} ({e}); the job's state is kept "
                         f"in {kept}, so the same command continues once it is reachable")
    return e


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])
    return str(e)


def _save(run: runs.Run, state: dict) -> None:
    storage.replace_text(run.train_remote_job, json.dumps(state, indent=2))


def _load(run: runs.Run) -> dict:
    location = run.train_remote_job
    return json.loads(storage.read_text(location)) if storage.exists(location) else {}


def request_of(cfg: RaylabConfig, manifest: runs.DataManifest) -> dict:
    """What a job's result depends on: a kept job or result is reused only while it is equal."""
    r = cfg.train.remote
    return {"base_url": where(cfg), "model": r.model,
            "suffix": r.suffix, "validation": r.validation, "data_manifest_hash": runs.manifest_hash(manifest),
            "hyperparameters": {k: getattr(r, k) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
            "withheld_sources": sorted(s.name or f"source{i}" for i, s in enumerate(cfg.data.sources) if s.contains_pii)}


def _adopted(api, token: str):
    """The job an earlier attempt created with this request token (its answer was lost), or None."""
    for job in api.fine_tuning.jobs.list(limit=100).data:  # newest first: an earlier attempt is recent
        if (job.metadata or {}).get("raylab_request") == token:
            return job
    return None


def submit(cfg: RaylabConfig, manifest: runs.DataManifest, api, run: runs.Run, state: dict) -> dict:
    """Upload the files and create the job (each step kept in `state` as soon as it is made)."""
    r, remote = cfg.train.remote, where(cfg)
    if "files" not in state:
        ex = examples(cfg, manifest)
        files = {}
        for split in ("train", "val"):
            if ex[split] is None or (split == "val" and not r.validation):
                continue
            name = f"{cfg.run_name}-{split}.jsonl"
            try:
                uploaded = api.files.create(file=(name, ex[split]), purpose="fine-tune")
            except Exception as e:  # noqa: BLE001 - the provider's refusal, translated
                raise _refused(e, f"the upload of {name}", cfg) from None
            files[split] = {"id": uploaded.id, "records": ex["counts"][split], "bytes": len(ex[split]),
                            "sha256": hashlib.sha256(ex[split]).hexdigest()}
        events.emit("train.remote_upload", run=cfg.output_dir, provider=remote, files=files,
                    withheld=ex["counts"]["withheld"], data_manifest_hash=runs.manifest_hash(manifest))
        log.info(f"remote: sent {files['train']['records']:,} train and {files.get('val', {}).get('records', 0):,} "
                 f"val records to {remote}" + (f"; withheld (contains_pii): {ex['counts']['withheld']}"
                                                if ex["counts"]["withheld"] else ""))
        state = {"files": files, "withheld": ex["counts"]["withheld"], "request": request_of(cfg, manifest),
                 "token": uuid.uuid4().hex}
        _save(run, state)
    if "job" not in state:
        storage.remove_file(run.train_metrics)  # rows of an earlier job are not this one's
        hyper = state["request"]["hyperparameters"]
        body = {"model": r.model, "training_file": state["files"]["train"]["id"],
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
                # the token finds the job again if the answer to this request is lost (below)
                "metadata": {"raylab_request": state["token"], "raylab_run": cfg.run_name[:512]}}
        if "val" in state["files"]:
            body["validation_file"] = state["files"]["val"]["id"]
        if r.suffix:
            body["suffix"] = r.suffix
        try:
            job = _adopted(api, state["token"]) if state.get("create_sent") else None
            if job is None:
                _save(run, state | {"create_sent": True})
                # No automatic retry: a create whose answer was lost may have made a job (a paid
                # one), and OpenAI's API takes no idempotency key; a re-run looks for the token.
                job = api.with_options(max_retries=0).fine_tuning.jobs.create(**body)
        except Exception as e:  # noqa: BLE001
            raise _refused(e, f"the job on {r.model!r}", cfg) from None
        state |= {"job": job.id, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        _save(run, state)
        events.emit("train.remote_job", run=cfg.output_dir, provider=remote, job=job.id, model=r.model)
        log.info(f"remote: job {job.id} created at {remote} ({job.status})")
    return state


def _new_events(api, job_id: str, seen: set[str]) -> list:
    """Events not seen yet, oldest first (the API lists newest first; pages go back in time)."""
    out, after = [], None
    while True:
        page = api.fine_tuning.jobs.list_events(job_id, limit=100, **({"after": after} if after else {}))
        fresh = [e for e in page.data if e.id not in seen]
        out += fresh
        if len(fresh) < len(page.data) or not page.has_more or not page.data:
            return list(reversed(out))
        after = page.data[-1].id


def _metrics_row(data: dict) -> dict | None:
    """A `metrics` event's data as a train/metrics.jsonl row (the names raylab's own rows use)."""
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        return None

    def num(key):
        v = data.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    row = {"step": data["step"], "time": time.time(), "loss": num("train_loss")}
    if num("valid_loss") is not None:
        row |= {"evaluated": True, "val_loss": num("valid_loss"), "val_token_accuracy": num("valid_mean_token_accuracy")}
    return {k: v for k, v in row.items() if v is not None}


def follow(cfg: RaylabConfig, api, run: runs.Run, state: dict):
    """Poll the job until it ends, logging its events and keeping its metrics; the final job."""
    r = cfg.train.remote
    seen, steps = set(state.get("seen_events", [])), {row["step"] for row in _rows(run)}
    created = datetime.datetime.fromisoformat(state["created"]).timestamp()
    deadline = created + r.timeout_h * 3600  # from the job's creation, across re-runs that follow it
    while True:
        try:
            job = api.fine_tuning.jobs.retrieve(state["job"])
            fresh = _new_events(api, state["job"], seen)
        except Exception as e:  # noqa: BLE001
            raise _refused(e, f"reading job {state['job']}", cfg) from None
        for ev in fresh:
            seen.add(ev.id)
            row = _metrics_row(ev.data) if ev.type == "metrics" else None
            if row is not None and row["step"] not in steps:
                steps.add(row["step"])
                storage.append_text(run.train_metrics, json.dumps(row) + "\n")
            if ev.type != "metrics" or row is None or row["step"] % cfg.train.log_every == 0:
                log.info(f"remote: {ev.message}")
        if fresh:
            _save(run, state | {"seen_events": sorted(seen)})
        if job.status in DONE:
            return job
        if time.time() > deadline:
            try:
                api.fine_tuning.jobs.cancel(state["job"])
                how = "cancelled at the provider"
            except Exception as e:  # noqa: BLE001 - the timeout is the error to report
                how = f"its cancel failed ({e}): cancel it at the provider"
            raise RunFailed(f"remote job {state['job']} still {job.status} after train.remote.timeout_h="
                            f"{r.timeout_h:g}; {how}")
        time.sleep(r.poll_s)


def _rows(run: runs.Run) -> list[dict]:
    if not storage.exists(run.train_metrics):
        return []
    return [json.loads(line) for line in storage.read_text(run.train_metrics).splitlines() if line.strip()]


def pointer(cfg: RaylabConfig, state: dict, job) -> dict:
    """train/final/remote.json: what the remote version is, and the metadata a card needs."""
    rows = _rows(runs.Run(cfg.output_dir))
    evaluated = [row for row in rows if row.get("evaluated")]
    last = evaluated[-1] if evaluated else {}
    request = state["request"]
    return {
        "stage": "train", "provider": "openai_compatible", "base_url": request["base_url"], "job": state["job"],
        "fine_tuned_model": job.fine_tuned_model, "base_model": request["model"], "method": "remote",
        "hyperparameters": request["hyperparameters"], "provider_hyperparameters": _plain(job.hyperparameters),
        "files": state["files"], "withheld": state["withheld"], "data_manifest_hash": request["data_manifest_hash"],
        "trained_tokens": int(job.trained_tokens or 0), "steps": max((row["step"] for row in rows), default=0),
        "metrics": {"val_loss": last.get("val_loss"), "val_token_accuracy": last.get("val_token_accuracy"),
                    "train_loss": rows[-1].get("loss") if rows else None},
        "metrics_source": "the provider's metrics events",
        "identity": f"remote:{state['job']}", "created": state["created"], "request": request,
        "finished_at": job.finished_at, "organization_id": getattr(job, "organization_id", None),
    }


def _plain(value):
    return value.model_dump() if hasattr(value, "model_dump") else value


def _start_over(run: runs.Run, why: str, state: dict) -> None:
    if state.get("job"):
        why += f"; job {state['job']} is left as it is at the provider"
    log.info(f"remote: {why}: sending the data again")
    for location in (run.train_remote_pointer, run.train_remote_job, run.train_metrics):
        storage.remove_file(location)


def run_remote(cfg: RaylabConfig, track: bool = True) -> dict:
    """Train at the provider and (with `track` and registry.enabled) register a remote version."""
    with events.stage("train", run=cfg.output_dir, provider="openai_compatible"):
        run = runs.Run(cfg.output_dir)
        manifest = runs.read_manifest(run, cfg.source)
        request = request_of(cfg, manifest)
        done = run.train_remote_pointer
        meta = json.loads(storage.read_text(done)) if storage.exists(done) else None
        state = _load(run)
        if meta is not None and meta.get("request") == request and cfg.train.resume:
            log.info(f"train: remote job {meta['job']} finished already: {meta['fine_tuned_model']}")
        else:
            kept = meta or state
            if kept and not cfg.train.resume:
                _start_over(run, "train.resume is false", state)
                state = {}
            elif kept and kept.get("request") != request:
                changed = sorted(k for k in request if (kept.get("request") or {}).get(k) != request[k])
                _start_over(run, f"{', '.join(changed)} changed since the kept job", state)
                state = {}
            meta = _train(cfg, manifest, run, state)
    if not (track and cfg.registry.enabled):
        return meta
    from raylab import registry

    return meta | {"registry": registry.track_train(cfg, meta, extra=registry.remote_tags(meta))}


def _train(cfg: RaylabConfig, manifest: runs.DataManifest, run: runs.Run, state: dict) -> dict:
    """Submit (or find the kept job), follow it to its end, write the pointer; its contents."""
    config.write_resolved(cfg)  # this run's config, as MLflow records it (the data stage's may be older)
    api = client(cfg)
    state = submit(cfg, manifest, api, run, state)
    try:
        job = follow(cfg, api, run, state)
    except KeyboardInterrupt:
        log.info(f"remote: stopped following; job {state['job']} goes on at the provider, and the same "
                 "command follows it again")
        raise
    if job.status != "succeeded" or not job.fine_tuned_model:
        error = _plain(job.error) or {}
        raise RunFailed(f"remote job {state['job']} {job.status} at {state['request']['base_url']}"
                        + ("" if job.fine_tuned_model or job.status != "succeeded" else " without a fine_tuned_model")
                        + f": {error.get('message') or 'no error given'}; fix the cause and run the same command "
                        f"again after deleting {run.train_remote_job} (it would follow the ended job)")
    meta = pointer(cfg, state, job)
    storage.replace_text(run.train_remote_pointer, json.dumps(meta, indent=2))
    log.info(f"train: remote job {state['job']} succeeded: {job.fine_tuned_model}")
    return meta
