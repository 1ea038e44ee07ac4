"""The Ray Serve application behind `raylab serve`: an OpenAI-compatible API over registry
versions, with continuous batching and LoRA adapters multiplexed onto one base model.

    raylab serve configs/quickstart.yaml          # deploys it (see deploy.py)
    serve deploy runs/quickstart/serve/serve.yaml # the same app, from the emitted config

Two deployments, or three or four, built by `build(args)` (the config's
`import_path: raylab.serve:build`):

- `Ingress`: one FastAPI app assembled by `create_app(ROUTERS, ingress)` from one router per
  concern (routers/: health and metadata, OpenAI inference, explanations, and with
  `api.enabled` the fine-tuning service's files and jobs, finetune.py); a new route is a
  router added to `ROUTERS`. The ingress holds what the routes share: API keys, limits, the Generator's
  handle and the routing table (request `model` names -> registry versions). Its
  `user_config` holds that table, so `raylab deploy` switches versions with `reconfigure`,
  no restart; the table is also looked up at request time, so a version of the served model
  registered after the deploy (`NAME/N`) is servable without one.
- `Generator` (autoscaled, generator.py): one base model per replica, registry versions
  multiplexed onto it, generating through an engine (engine.py: continuous batching).
- `Explainer` (autoscaled, explainer.py; only with `serve.explain.enabled`): token
  attributions for `POST /v1/explain`, in replicas of their own so they never stall a decode.
- `Embedder` (with `serve.rag`, retrieval.py): the index and its embedding model, for chat
  retrieval and /v1/embeddings.

`args` (changing them restarts replicas) and the `user_config`s are written by deploy.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylab import registry
from raylab.core import access
from raylab.errors import UserError
from raylab.serve import openai_api as oa
from raylab.serve.auth import api_keys, authenticate
from raylab.serve.canary import canary_share
from raylab.serve.deploy import catalog
from raylab.serve.explainer import explainer_deployment
from raylab.serve.generator import generator_deployment
from raylab.serve.metrics import Metrics, version_tags
from raylab.serve.retrieval import EmbedderImpl
from raylab.serve.routers import (
    embeddings,
    explain,
    feedback,
    files,
    fine_tuning,
    health,
    inference,
    release,
)
from raylab.serve.sample import PromptSample

log = logging.getLogger("ray.serve")
ROUTERS: tuple[APIRouter, ...] = (health.router, inference.router, embeddings.router, explain.router, files.router,
                                  fine_tuning.router, release.router, feedback.router)
ANSWERED = 10_000  # recent response ids kept for POST /v1/feedback (which version answered)


async def _http_error(_request, exc: StarletteHTTPException):  # unknown paths and methods, OpenAI-shaped
    return JSONResponse(oa.ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code)


async def _api_error(_request, exc: oa.ApiError):  # raised by a route (the fine-tuning service's)
    return JSONResponse(exc.body(), exc.status)


async def _invalid(_request, exc: RequestValidationError):  # a bad query parameter: 400 naming it
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"][1:])
    return JSONResponse(oa.ApiError(400, f"{param}: {first['msg']}", param or None, "invalid_value").body(), 400)


def create_app(routers: Iterable[APIRouter], ingress=None) -> FastAPI:
    """The ingress's FastAPI app: `routers` mounted, errors OpenAI-shaped, and `ingress` (the
    object whose state the routes use, see routers/__init__.py) on `app.state`."""
    api = FastAPI(title="raylab", docs_url=None, redoc_url=None)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(oa.ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.state.ingress = ingress
    for router in routers:
        api.include_router(router)
    return api


class IngressImpl:
    """The Ingress deployment's code (kept importable under its own name: Serve's
    decorators subclass it, and the subclass is shipped by value). Serve builds its app on
    the replica, after `__init__`, through `__serve_build_asgi_app__`."""

    routers: tuple[APIRouter, ...] = ROUTERS

    def __init__(self, generator, args: dict, explainer=None, embedder=None):
        self.generator, self.args, self.limits = generator, args, args["limits"]
        # serve.rag: the Embedder's handle (or an in-process EmbedderImpl) and its arguments
        self.embedder, self.rag = embedder, args.get("rag")
        self.keys = api_keys(args)
        self.database = args.get("api_keys_database")  # serve.api_keys_db: keys from `raylab keys create`
        self.verifier = _verifier(args.get("oidc"))  # serve.oidc: JWTs from governance.oidc's issuer
        self.explainer = explainer  # None: serve.explain is off, /v1/explain answers 404
        # api.enabled: the fine-tuning service in this ingress (one base URL); None: its routes answer 404
        self.ftapi = _fine_tuning(args.get("api"))
        settings = args.get("explain")
        self.explained = explain.Recent(settings["keep_results"], settings["keep_seconds"]) if settings else None
        self.routes: dict[str, str] = {}
        self.listed: list[str] = []
        self.default: str | None = None
        self.registry = True
        self.canary: dict | None = None  # {candidate, percent, controller, namespace} while a rollout runs
        self._controller = None  # its actor handle, looked up on the first report
        self.answered: OrderedDict[str, str] = OrderedDict()  # response id -> version, for feedback
        self.store = None  # the registry, opened on the first lookup
        # per-version Prometheus series (metrics.py) and the served-prompt sample (sample.py)
        self.metrics = Metrics(["requests", "errors", "latency_seconds", "prompt_tokens", "completion_tokens"])
        monitor = args.get("monitor")  # None: no run directory to write a sample into (a plain `serve MODEL`)
        self.sample = PromptSample(monitor, _replica_name()) if monitor and monitor["sample_prompts"] else None

    def record(self, model: str, version: str | None, status: int, started: float, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        """One answered generation request in the per-version metrics."""
        tags = version_tags(version, model)
        self.metrics.inc("requests", tags | {"status": str(status)})
        if status >= 400:
            self.metrics.inc("errors", tags | {"status": str(status)})
        self.metrics.observe("latency_seconds", time.monotonic() - started, tags)
        self.metrics.inc("prompt_tokens", tags, prompt_tokens)
        self.metrics.inc("completion_tokens", tags, completion_tokens)
        if self.canary is not None and version in (self.default, self.canary["candidate"]):
            self.report("observe", version, status, time.monotonic() - started, completion_tokens)

    def split(self, model: str, version: str | None, user: str | None, request: Request) -> str | None:
        """The version a request goes to while a canary runs: production traffic (the model's
        name or NAME@production, routed to the default) goes to the candidate for the
        `percent` share of keys: the request's `user`, else its API key, else its client's
        address (stable, so one user sees one version). A pinned NAME/N is never split."""
        c = self.canary
        if c is None or version != self.default or model not in (self.served, f"{self.served}@production"):
            return version
        key = user or request.headers.get("authorization", "") or (request.client.host if request.client else "")
        return c["candidate"] if canary_share(key, c["percent"], c["candidate"]) else version

    def answered_by(self, rid: str, version: str) -> None:
        """Remember which version answered `rid` (bounded), so its feedback counts for that version."""
        self.answered[rid] = version
        while len(self.answered) > ANSWERED:
            self.answered.popitem(last=False)

    def report(self, method: str, *args) -> None:
        """Tell the canary controller (fire and forget: a request never waits for it, and a
        controller restarting meanwhile loses at most these reports)."""
        try:
            if self._controller is None:
                import ray

                self._controller = ray.get_actor(self.canary["controller"], namespace=self.canary["namespace"])
            getattr(self._controller, method).remote(*args)
        except Exception as e:  # no controller (yet): the rollout's metrics miss this request
            log.warning(f"canary controller unreachable: {e!r}")
            self._controller = None

    def keep_prompt(self, text: str) -> None:
        """Offer a served prompt to the sample; its file is rewritten off the event loop."""
        if self.sample is not None and self.sample.add(text):
            asyncio.get_running_loop().run_in_executor(None, self.sample.flush).add_done_callback(_logged)

    def __del__(self):
        # Serve calls it when the replica shuts down gracefully: write what is unsaved
        if getattr(self, "sample", None) is not None:
            try:
                self.sample.flush()
            except Exception:
                log.exception("could not write the served-prompt sample")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.routers, self)

    def reconfigure(self, user_config: dict) -> None:
        """The routing table: request `model` names -> registry versions (NAME/VERSION)."""
        self.routes = dict(user_config["routes"])
        self.listed = list(user_config["listed"])
        self.default = user_config["default"]
        self.registry = user_config.get("registry", True)  # False: a plain model, no versions to look up
        self.canary = user_config.get("canary")
        self._controller = None

    async def route(self, model: str, principal: access.Principal | None = None) -> str | None:
        """The registry version (NAME/VERSION) a request's `model` goes to, or None. A
        `NAME/N` of the served model that the table lacks is looked up in the registry (a
        version registered after the deploy); other names are not. A fine-tuning job's
        `ft:...` name (with api.enabled) is looked up in the service's table, for callers of
        the job's organisation only (or an endpoint without keys)."""
        if model.startswith("ft:") and self.ftapi is not None:
            target = await asyncio.to_thread(self.ftapi.model_version, model, principal)
            return await self.route(target) if target else None
        if (model not in self.routes and self.default and self.registry
                and re.fullmatch(re.escape(self.served) + r"/\d+", model)):
            await self.refresh()
        return self.routes.get(model)

    @property
    def served(self) -> str:
        """The model name this endpoint serves."""
        return self.default.rsplit("/", 1)[0]

    async def refresh(self) -> None:
        """Add the served model's versions registered since the table was made (its names,
        aliases and default stay as deployed: `raylab deploy` changes those)."""
        if not self.default or not self.registry:
            return
        default = self.default
        try:
            fresh = await asyncio.to_thread(self._catalog, default)
        except UserError:  # the model was deleted from the registry: serve what the table has
            return
        if default != self.default:  # `raylab deploy` reconfigured meanwhile; its table is newer
            return
        for name in fresh["listed"]:
            if name not in self.routes and fresh["routes"][name] == name:  # a NAME/N entry
                self.routes[name] = name
                self.listed.append(name)

    def _catalog(self, default: str) -> dict:
        if self.store is None:
            self.store = registry.open_store(tracking_uri=self.args["tracking_uri"])
        name, version = default.rsplit("/", 1)
        return catalog(self.store, name, int(version))

    async def explain(self, version: str, job: dict) -> dict:
        """The Explainer's answer for `job` on `version`: {"result"} or {"error"}; a 429 when
        its replicas are busy and `serve.explain.max_queued_requests` wait already."""
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.explainer.options(multiplexed_model_id=version).explain.remote(job)
        except BackPressureError:
            raise oa.ApiError(429, "too many explanations are waiting (serve.explain.max_queued_requests); retry later",
                              code="rate_limit_exceeded") from None

    async def authorized(self, request: Request) -> access.Principal | None:
        """`authorize`, off the event loop when it may wait on the control-plane database or the
        issuer's key set (static keys are compared inline: no I/O)."""
        if self.database or self.verifier is not None:
            return await asyncio.to_thread(self.authorize, request)
        return self.authorize(request)

    def authorize(self, request: Request) -> access.Principal | None:
        """Every route's check: a static key, or a control-plane key whose role may serve.infer
        (allowed requests are not each audited, refusals are: core.access.authorize). Returns
        the caller (None: an endpoint without keys), whose org retrieval and `ft:` models are
        limited to."""
        if not self.keys and not self.database and self.verifier is None:
            return None
        principal = authenticate(request.headers.get("authorization", ""), self.keys, self.database, self.verifier)
        if principal is None:
            raise oa.ApiError(401, "Incorrect, expired or missing API key or token: send Authorization: Bearer <key>",
                              code="invalid_api_key")
        decision = access.authorize(principal, "serve.infer", record_allow=False)
        if not decision.allowed:
            raise oa.ApiError(403, f"not allowed: {decision.reason}", code="permission_denied")
        return principal


def _verifier(section: dict | None):
    """The OIDC verifier for governance.oidc as deploy.oidc_args wrote it, or None."""
    if not section:
        return None
    from raylab.config.governance import OidcConfig
    from raylab.core.access import oidc

    return oidc.Verifier.from_section(OidcConfig.model_validate(section))


def _fine_tuning(settings: dict | None):
    """The FineTuning service from the args deploy.api_args wrote (the template config as YAML
    and the control-plane database's URL), or None."""
    if not settings:
        return None
    from raylab import config
    from raylab.serve.finetune import FineTuning

    return FineTuning(config.load_text(settings["config"], source="api (the fine-tuning service's template)"),
                      settings["database"])


def _logged(done: asyncio.Future) -> None:
    """A sample write's failure in the server log (a monitoring gap, never a failed request)."""
    if not done.cancelled() and done.exception() is not None:
        log.error(f"could not write the served-prompt sample: {done.exception()!r}")


def _replica_name() -> str:
    """This Ingress replica's id (its sample file's name); a process id outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # RayServeException: an ingress built in a test or a notebook
        return f"local-{os.getpid()}"


Ingress = serve.deployment(name="Ingress")(serve.ingress()(IngressImpl))
Embedder = serve.deployment(name="Embedder")(EmbedderImpl)


def build(args: dict):
    """The application for `serve deploy` / the REST API: import path `raylab.serve:build`."""
    generator = generator_deployment(int(args["limits"]["max_adapters_per_replica"])).bind(args)
    settings = args.get("explain")  # None: no Explainer deployment at all
    explainer = explainer_deployment(int(settings["max_models_per_replica"])).bind(args) if settings else None
    embedder = Embedder.bind(args["rag"]) if args.get("rag") else None  # None: no serve.rag
    return Ingress.bind(generator, args, explainer, embedder)
