"""The fine-tuning service behind /v1/files and /v1/fine_tuning/jobs: files kept through
core.storage (sealed when governance.encryption is on), jobs validated by the data stage's
rules, turned into a raylab config and submitted to the Ray cluster through core.jobs.

    service = FineTuning(cfg)                 # cfg: the template config `raylab api CONFIG` loaded
    principal = service.caller(authorization_header)
    service.create_file(principal, "train.jsonl", data, "fine-tune")
    service.create_job(principal, body)       # validating_files -> queued (submitted) | 400

Every refusal a caller can cause is an `openai_api.ApiError` (OpenAI's error body); every
decision goes through core.access (audited). Rows are org-scoped (ftstore.py): another
organisation's file or job is a 404, exactly like one that does not exist.

Job states: validating_files (the request's files are checked before anything is kept, so a
bad file is a 400 and nothing is left behind) -> queued (the Ray job is submitted) -> running
-> succeeded | failed | cancelled, refreshed from the Ray job's status when a job is read;
`paused` (pause: the Ray job stopped) -> queued again on resume (the same run directory, so
training continues from its latest checkpoint). Metrics events and checkpoints are read from
the run's files (train/metrics.jsonl, checkpoint_*/) when a job's events or checkpoints are
listed (not on every read of a job: listing jobs reads no run files).
"""

from __future__ import annotations

import json
import logging
import tempfile

from raylab import data as data_stage
from raylab.core import access, controldb, jobs, runs, storage
from raylab.core.access import oidc
from raylab.errors import UserError
from raylab.serve import ftstore
from raylab.serve import openai_api as oa
from raylab.serve.ftrequests import Hyperparameters, JobRequest, too_large
from raylab.serve.registry_api import RegistryOps

log = logging.getLogger("ray.serve")
PURPOSES = ("fine-tune",)  # what an upload may be for; job results are "fine-tune-results"
TERMINAL = ("succeeded", "failed", "cancelled")
RAY_STATES = {"PENDING": "queued", "RUNNING": "running"}


class FineTuning:
    """The service's state: the template config, the control-plane database, storage roots."""

    def __init__(self, cfg, db_url: str | None = None):
        self.cfg, self.settings = cfg, cfg.api
        self.db = db_url or controldb.url()
        home = runs.home()
        self.files_root = self.settings.files or str(home.api_files)
        self.runs_root = self.settings.runs or str(home.api_runs)
        self.bases = dict(self.settings.base_models) or {cfg.model.name_or_path: cfg.model.name_or_path}
        oidc_section = getattr(cfg.governance, "oidc", None)
        self.verifier = oidc.Verifier.from_section(oidc_section) if oidc_section else None
        self.models = RegistryOps(cfg, self.settings.address)  # /v1/registry: promote, rollback, deploy

    # ------------------------------------------------------------ who may

    def caller(self, header: str) -> access.Principal:
        principal = access.authenticate(header, self.db, self.verifier)
        if principal is None:
            raise oa.ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                              code="invalid_api_key")
        return principal

    @staticmethod
    def allow(principal, action: str, resource: access.Resource | None = None) -> None:
        d = access.authorize(principal, action, resource or access.Resource(action.split(".")[0], org=principal.org))
        if not d.allowed:
            raise oa.ApiError(d.status, f"not allowed: {d.reason}", code="permission_denied"
                              if d.status == 403 else None)

    # ------------------------------------------------------------ files

    def create_file(self, principal, filename: str, data: bytes, purpose: str) -> dict:
        self.allow(principal, "files.create")
        if purpose not in PURPOSES:
            raise oa.ApiError(400, f"purpose {purpose!r} is not supported; use 'fine-tune'", "purpose")
        if len(data) > self.settings.max_file_bytes:
            raise too_large(len(data), self.settings.max_file_bytes)
        try:
            data_stage.parse_jsonl(data)
        except data_stage.ChatFileError as e:
            raise oa.ApiError(400, f"{filename}: {e}; a fine-tune file is JSON lines, one chat example per line",
                              "file", "invalid_file_format") from None
        return self._keep(principal, filename[:255] or "upload.jsonl", data, purpose)

    def _keep(self, principal, filename: str, data: bytes, purpose: str) -> dict:
        import hashlib

        file_id = ftstore.new_id("file")
        location = runs.api_file(self.files_root, principal.org, file_id)
        storage.write_bytes(location, data)
        row = {"id": file_id, "org": principal.org, "purpose": purpose, "filename": filename, "bytes": len(data),
               "created_at": ftstore.now(), "created_by": principal.subject, "location": location,
               "sha256": hashlib.sha256(data).hexdigest()}
        try:
            return ftstore.insert_file(self.db, row)
        except Exception:
            storage.remove_file(location)  # no file without its row
            raise

    def file(self, principal, file_id: str, action: str = "files.read") -> dict:
        self.allow(principal, action)
        row = ftstore.get_file(self.db, principal.org, file_id)
        if row is None:
            raise oa.ApiError(404, f"No such File object: {file_id}", "id", "file_not_found")
        return row

    def files(self, principal, purpose: str | None) -> list[dict]:
        self.allow(principal, "files.read")
        return ftstore.list_files(self.db, principal.org, purpose)

    def content(self, principal, file_id: str) -> bytes:
        return storage.read_bytes(self.file(principal, file_id)["location"])

    def delete_file(self, principal, file_id: str) -> dict:
        row = self.file(principal, file_id, "files.delete")
        ftstore.delete_file(self.db, principal.org, file_id)
        storage.remove_file(row["location"])
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------ jobs

    def create_job(self, principal, request: JobRequest) -> dict:
        """Validate everything, keep the job and its config, submit it (see the module docstring)."""
        self.allow(principal, "jobs.create")
        hyper = request.hyper()
        if request.model not in self.bases:
            raise oa.ApiError(400, f"model {request.model!r} is not a base model this service fine-tunes; "
                              f"available: {', '.join(sorted(self.bases))}", "model", "model_not_found")
        training = self._checked(principal, request.training_file, "training_file", self.settings.min_examples)
        validation = (self._checked(principal, request.validation_file, "validation_file", 1)
                      if request.validation_file else None)
        job_id = ftstore.new_id("ftjob")
        output_dir = runs.api_run(self.runs_root, job_id)
        cfg, resolved = self.job_config(request, hyper, training, validation, output_dir)
        # Everything checked: from here on the job exists.
        result = self._keep(principal, f"{job_id}-config.yaml", _yaml(cfg).encode(), "fine-tune-results")
        row = {"id": job_id, "org": principal.org, "created_by": principal.subject, "created_at": ftstore.now(),
               "finished_at": None, "model": request.model, "suffix": request.suffix, "status": "validating_files",
               "training_file": request.training_file, "validation_file": request.validation_file,
               "request": json.dumps({"seed": cfg.train.seed, "metadata": request.metadata}),
               "hyperparameters": json.dumps(resolved), "result_files": json.dumps([result["id"]]), "error": None,
               "ray_job_id": None, "output_dir": output_dir, "fine_tuned_model": None, "trained_tokens": None}
        ftstore.insert_job(self.db, row)
        ftstore.add_event(self.db, job_id, "info", f"Validating training file: {request.training_file}")
        ftstore.add_event(self.db, job_id, "info", f"Files validated: {training['valid']} examples "
                          f"({training['duplicates']} duplicates dropped)", data={"pii": training["pii"]})
        self._submit(principal, job_id, cfg)
        return ftstore.get_job(self.db, principal.org, job_id)

    def _checked(self, principal, file_id: str, param: str, min_examples: int) -> dict:
        row = ftstore.get_file(self.db, principal.org, file_id)
        if row is None or row["purpose"] != "fine-tune":
            raise oa.ApiError(400, f"invalid {param}: {file_id} (no fine-tune file of that id)", param,
                              "invalid_file")
        try:
            report = data_stage.check_chat_file(storage.read_bytes(row["location"]), self.cfg.data, min_examples,
                                                self.settings.on_pii == "reject")
        except data_stage.ChatFileError as e:
            raise oa.ApiError(400, f"{param} {file_id}: {e}", param, "invalid_file_format") from None
        if not report.ok:
            raise oa.ApiError(400, f"{param} {file_id}: {report.message()}", param, "invalid_training_file")
        return {"location": row["location"], "valid": report.valid, "duplicates": report.duplicates,
                "pii": report.pii}

    def job_config(self, request: JobRequest, hyper: Hyperparameters, training: dict, validation: dict | None,
                   output_dir: str):
        """The template config with this job's base model, data and hyper-parameters: (config,
        the hyper-parameters with "auto" resolved). A combination the config refuses is a 400."""
        from raylab import config

        raw = self.cfg.model_dump(mode="json", exclude_none=True)
        raw.pop("api", None)
        raw["output_dir"] = output_dir
        sources = [{"type": "jsonl", "path": training["location"], "format": "chat", "name": "training_file"}]
        raw["data"] |= {"sources": sources, "format": "chat"}
        if validation is not None:  # the job holds out its own file instead of a share of the training one
            sources.append({"type": "jsonl", "path": validation["location"], "format": "chat", "name": "validation_file"})
            raw["data"] |= {"val_fraction": 0.0, "val_sources": ["validation_file"]}
        raw["model"]["name_or_path"] = self.bases[request.model]
        train = raw["train"]
        if hyper.n_epochs != "auto":
            train["epochs"] = hyper.n_epochs
            train.pop("max_steps", None)
        if hyper.batch_size != "auto":
            train["batch_size"] = hyper.batch_size
        multiplier = 1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier
        train["lr"] = train.get("lr", 2e-4) * multiplier
        if request.seed is not None:
            train["seed"] = request.seed
        model = raw["model"]
        if hyper.method is not None:
            model["method"] = hyper.method
        lora = model.setdefault("lora", {})
        for key, name in (("lora_r", "r"), ("lora_alpha", "alpha"), ("target_modules", "target_modules")):
            if getattr(hyper, key) is not None:
                lora[name] = getattr(hyper, key)
        raw.setdefault("tune", None)
        raw.pop("tune")  # a job trains; sweeps are not part of this API
        try:
            cfg = config.load_dict(raw, source=f"fine-tuning job {output_dir.rsplit('/', 1)[-1]}")
        except UserError as e:
            raise oa.ApiError(400, f"the job's config is not valid: {str(e)[:1000]}", "hyperparameters") from None
        resolved = {"n_epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                    "learning_rate_multiplier": multiplier}
        return cfg, resolved

    def _submit(self, principal, job_id: str, cfg) -> None:
        env = [f"{access.ORG_ENV}={principal.org}", f"RAYLAB_USER={principal.subject}"]
        try:
            with tempfile.TemporaryDirectory(prefix="raylab-ftjob-") as empty:  # the job needs no local files
                ray_job = jobs.submit(cfg, self.settings.address, working_dir=empty, env=env, flags=["--no-serve"])
        except UserError as e:
            self._fail(job_id, "submission_failed", f"the job could not be submitted to the Ray cluster: {e}")
            return
        ftstore.update_job(self.db, job_id, unless=TERMINAL, status="queued", ray_job_id=ray_job)
        ftstore.add_event(self.db, job_id, "info", f"Job queued on the Ray cluster as {ray_job}")

    def _fail(self, job_id: str, code: str, message: str) -> None:
        ftstore.update_job(self.db, job_id, unless=TERMINAL, status="failed", finished_at=ftstore.now(),
                           error={"code": code, "message": message, "param": None})
        ftstore.add_event(self.db, job_id, "error", message)

    def job(self, principal, job_id: str, action: str = "jobs.read") -> dict:
        self.allow(principal, action)
        row = ftstore.get_job(self.db, principal.org, job_id)
        if row is None:
            raise oa.ApiError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found")
        return self.refresh(row)

    def jobs(self, principal, after: str | None, limit: int) -> tuple[list[dict], bool]:
        self.allow(principal, "jobs.read")
        rows, more = ftstore.list_jobs(self.db, principal.org, after, limit)
        return [self.refresh(r) for r in rows], more

    def events(self, principal, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        self.sync_metrics(self.job(principal, job_id))
        return ftstore.list_events(self.db, job_id, after, limit)

    def sync_metrics(self, row: dict) -> int:
        """The run's logged training steps (train/metrics.jsonl) as `metrics` events, each step
        once: read when a job's events are listed and when it succeeds, not pushed by the
        run, so the Ray job needs no route back to the service."""
        if not row.get("output_dir"):
            return 0
        location = runs.Run(row["output_dir"]).train_metrics
        try:
            text = storage.read_text(location) if storage.exists(location) else ""
        except (OSError, UserError) as e:  # unreadable for now (being rewritten, storage away): next read
            log.warning(f"job {row['id']}: cannot read {location}: {e}")
            return 0
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return ftstore.add_metrics(self.db, row["id"], [metrics_data(r) for r in rows])

    def checkpoints(self, principal, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """The job's kept training checkpoints as OpenAI's `fine_tuning.job.checkpoint`
        objects, newest first (the run keeps the best `train.keep_checkpoints` by validation
        loss plus the latest). Their ids are derived from the job and step, so they are
        stable without a table."""
        row = self.job(principal, job_id)
        objects = [checkpoint_object(row, c, ft_name(row)) for c in reversed(kept_checkpoints(row))]
        if after:
            ids = [o["id"] for o in objects]
            objects = objects[ids.index(after) + 1:] if after in ids else []
        return objects[:limit], len(objects) > limit

    def cancel(self, principal, job_id: str) -> dict:
        row = self.job(principal, job_id, "jobs.cancel")
        if row["status"] in TERMINAL:
            raise oa.ApiError(400, f"job {job_id} has already {row['status']}: a finished job cannot be cancelled",
                              "fine_tuning_job_id", "job_already_finished")
        if row["ray_job_id"]:
            try:
                jobs.stop(row["ray_job_id"], self.settings.address)
            except UserError as e:  # the cluster is gone: the job is not running either way
                log.warning(f"stopping Ray job {row['ray_job_id']} of {job_id}: {e}")
        if ftstore.update_job(self.db, job_id, unless=TERMINAL, status="cancelled", finished_at=ftstore.now()):
            ftstore.add_event(self.db, job_id, "info", "Job cancelled")
        return ftstore.get_job(self.db, principal.org, job_id)

    def pause(self, principal, job_id: str) -> dict:
        """`paused`: the Ray job is stopped; its run keeps its checkpoints (needs jobs.cancel)."""
        row = self.job(principal, job_id, "jobs.cancel")
        if row["status"] not in ("queued", "running"):
            raise oa.ApiError(400, f"job {job_id} is {row['status']}: only a queued or running job can be paused",
                              "fine_tuning_job_id", "job_not_running")
        # the state first: a refresh racing the stop must not read the STOPPED Ray job as a failure
        if not ftstore.update_job(self.db, job_id, unless=(*TERMINAL, "paused"), status="paused"):
            return ftstore.get_job(self.db, principal.org, job_id)
        try:
            jobs.stop(row["ray_job_id"], self.settings.address)
        except UserError as e:  # the cluster is gone: the job is not running either way
            log.warning(f"stopping Ray job {row['ray_job_id']} of {job_id}: {e}")
        kept = kept_checkpoints(row)
        kept = kept[-1]["step"] if kept else None
        ftstore.add_event(self.db, job_id, "info", "Job paused" + (f"; it resumes from the checkpoint at step {kept}"
                                                                   if kept is not None else "; no checkpoint yet, "
                                                                   "it resumes from the start"))
        return ftstore.get_job(self.db, principal.org, job_id)

    def resume(self, principal, job_id: str) -> dict:
        """A paused job submitted again with its kept config (its first result file): the same
        run directory, so the data stage's output is reused and training continues from the
        latest checkpoint (the train stage's resume). Needs jobs.create: it starts compute."""
        row = self.job(principal, job_id, "jobs.create")
        if row["status"] != "paused":
            raise oa.ApiError(400, f"job {job_id} is {row['status']}: only a paused job can be resumed",
                              "fine_tuning_job_id", "job_not_paused")
        from raylab import config

        kept = ftstore.get_file(self.db, row["org"], json.loads(row["result_files"])[0])
        cfg = config.load_dict(yaml_load(storage.read_text(kept["location"])), source=f"fine-tuning job {job_id}")
        ftstore.add_event(self.db, job_id, "info", "Job resumed")
        self._submit(principal, job_id, cfg)
        return ftstore.get_job(self.db, principal.org, job_id)

    def model_version(self, name: str, principal) -> str | None:
        """The registry version (NAME/VERSION) a fine-tuned model's name stands for, when the
        caller may use it: one of its organisation, or anyone on an endpoint without keys
        (`principal` None). Another org's model is None, as an unknown name is."""
        row = ftstore.get_model(self.db, name)
        if row is None or (principal is not None and principal.org != row["org"]):
            return None
        return f"{row['registry_name']}/{row['registry_version']}"

    def refresh(self, row: dict) -> dict:
        """A queued or running job's state from its Ray job (the cluster unreachable: as it was)."""
        if row["status"] in (*TERMINAL, "paused") or not row["ray_job_id"]:  # a paused job's Ray job is stopped
            return row
        try:
            current = jobs.status(row["ray_job_id"], self.settings.address)
        except UserError as e:
            log.warning(f"job {row['id']}: cannot read Ray job {row['ray_job_id']}: {e}")
            return row
        state = RAY_STATES.get(current.status)
        if state and state != row["status"]:
            if ftstore.update_job(self.db, row["id"], unless=TERMINAL, status=state):
                ftstore.add_event(self.db, row["id"], "info", f"Job {state}")
        elif current.status == "SUCCEEDED":
            self.record_success(row)
        elif current.status in ("FAILED", "STOPPED"):
            self._fail(row["id"], "job_failed", f"the Ray job {current.status.lower()}"
                       + (f": {current.message}" if current.message else ""))
        return ftstore.get_job(self.db, row["org"], row["id"])

    def record_success(self, row: dict) -> None:
        """A job whose Ray job SUCCEEDED: the version its run registered (run.json, written by
        `raylab run`) under the job's `ft:` name, the job `succeeded`."""
        summary = json.loads(storage.read_text(runs.Run(row["output_dir"]).summary))
        version = summary.get("version")
        name = None
        self.sync_metrics(row)  # the last steps' metrics before the success event
        if version:
            name = ft_name(row)
            ftstore.add_model(self.db, {"name": name, "org": row["org"], "job_id": row["id"],
                                        "registry_name": version["name"], "registry_version": int(version["version"])})
        if ftstore.update_job(self.db, row["id"], unless=TERMINAL, status="succeeded", finished_at=ftstore.now(),
                              fine_tuned_model=name):
            ftstore.add_event(self.db, row["id"], "info", "The job has successfully completed"
                              + (f": {name} is {version['name']}/{version['version']}" if version else
                                 " (registry.enabled is false: no model was registered)"))


def kept_checkpoints(row: dict) -> list[dict]:
    """The checkpoints a job's run keeps, oldest step first (train.list_checkpoints)."""
    from raylab import train

    return train.list_checkpoints(runs.Run(row["output_dir"]).train) if row.get("output_dir") else []


def ft_name(row: dict) -> str:
    """The model name a job's result is served under (OpenAI's ft:BASE:ORG:SUFFIX:ID shape)."""
    return f"ft:{row['model']}:{row['org']}:{row['suffix'] or ''}:{row['id']}"


def metrics_data(m: dict) -> dict:
    """A metrics.jsonl row as OpenAI's `metrics` event data (train_loss, valid_loss, ...),
    with raylab's own figures beside them."""
    import math

    def finite(v):  # metrics.jsonl writes NaN where a figure is undefined; JSON has no NaN
        return None if isinstance(v, float) and not math.isfinite(v) else v

    out = {"step": int(m["step"]), "train_loss": finite(m.get("loss"))}
    if m.get("evaluated") and m.get("val_loss") is not None:
        out |= {"valid_loss": finite(m["val_loss"]), "valid_mean_token_accuracy": finite(m.get("val_token_accuracy"))}
    return out | {k: finite(m.get(k)) for k in ("epoch", "lr", "tokens_per_s", "tokens") if finite(m.get(k)) is not None}


def checkpoint_object(row: dict, kept: dict, model: str) -> dict:
    import hashlib

    step = kept["step"]
    digest = hashlib.sha256(f"{row['id']}:{step}".encode()).hexdigest()[:24]
    metrics = metrics_data(kept["metrics"] | {"step": step}) if kept["metrics"] else {"step": step}
    created = kept["metrics"].get("time") or row["created_at"]
    return {"object": "fine_tuning.job.checkpoint", "id": f"ftckpt_{digest}", "created_at": int(created),
            "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}", "fine_tuning_job_id": row["id"],
            "metrics": metrics, "step_number": step}


def yaml_load(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def _yaml(cfg) -> str:
    from raylab import config

    return config.to_yaml(cfg)

