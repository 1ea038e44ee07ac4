"""The Explainer deployment behind `POST /v1/explain` (serve.explain.enabled): token
attributions (raylab.explain: integrated gradients, feature ablation, Shapley sampling, SHAP) of
the version a request's `model` routes to, in replicas of their own, so an explanation's
hundreds of forward and backward passes never hold up a decode step of the Generator.

    serve:
      explain: {enabled: true, max_replicas: 2}    # limits and defaults: the explain: section

Each replica runs torch on one thread (an explanation is many small passes; more threads
would only contend with the Generator's on a shared machine), loads versions with
`models.load` as `raylab explain` does (checksums verified, an adapter put onto its base,
float32 for the gradients), keeps `serve.explain.max_models_per_replica` of them
(`@serve.multiplexed`, least recently used evicted) and runs one explanation of a version at
a time: captum's integrated gradients hook the model's embedding layer, so two at once on
one model would see each other's hooks. The ingress passes the version as the
`multiplexed_model_id`; a client's mistake comes back as {"error": {status, message, param,
code}}, as the Generator's do, and the ingress answers it OpenAI-shaped.
"""

from __future__ import annotations

import asyncio

from ray import serve

from raylab import explain, models, registry
from raylab.config import EXPLAIN_METHODS
from raylab.errors import UserError
from raylab.serve import openai_api as oa


class Loaded:
    """One version in a replica: its model and tokenizer, and the lock its explanations take turns on."""

    def __init__(self, model, tok):
        self.model, self.tok, self.lock = model, tok, asyncio.Lock()


def check_installed(method: str) -> None:
    """ApiError(400) naming the extra when this replica lacks the method's package (shap for
    method shap, captum for the others)."""
    package, install = ("shap", explain.INSTALL_SHAP) if method == "shap" else ("captum", explain.INSTALL)
    try:
        explain.shap_module() if method == "shap" else explain.captum_attr()
    except UserError:
        raise oa.ApiError(400, f"method {method!r} needs {package}, which is not installed where the Explainer runs: "
                               f"install the explain extra there ({install})", "method",
                          "method_not_installed") from None


def features(tok, ids: list[int], job: dict) -> list[dict] | None:
    """The spans the request asks for, located in the rendered prompt (None: tokens), or
    ApiError(400) naming `spans` (or `granularity` when sentences were asked for)."""
    text = job["messages"][-1]["content"] if job["messages"] is not None else job["prompt"]
    granularity = job.get("granularity", "token")
    # documents: the spans of the retrieved chunks, which the ingress found in the rewritten message
    param = "granularity" if granularity != "token" else "spans"
    try:
        return explain.span_features(tok, ids, text, job.get("spans"), "token" if granularity == "document"
                                     else granularity, "spans")
    except UserError as e:
        raise oa.ApiError(400, str(e).replace("spans", param, 1), param, "invalid_value") from None


def prompt_ids(tok, job: dict) -> tuple[list[int], str]:
    """The prompt's token ids, rendered as serving renders it (`messages`: the chat template;
    `prompt`: plain text), and the request field they came from."""
    where = "messages" if job["messages"] is not None else "prompt"
    if job["messages"] is not None:
        item = {"messages": [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                             for m in job["messages"]]}
    else:
        item = {"text": job["prompt"]}
    try:
        return models.prompt_ids(tok, item, where), where
    except UserError as e:
        raise oa.ApiError(400, str(e), where) from None
    except Exception as e:  # a template that refuses this conversation (jinja raise_exception)
        raise oa.ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None


def explain_job(model, tok, job: dict, limits: dict) -> dict:
    """The attribution result of one checked request on a loaded version (raylab.explain's
    `explain_ids`, plus `target_source` and `output_text`), or ApiError(400) naming the field."""
    ids, where = prompt_ids(tok, job)
    if len(ids) > limits["max_prompt_tokens"]:
        raise oa.ApiError(400, f"the prompt has {len(ids)} tokens; the limit for explanations is "
                               f"{limits['max_prompt_tokens']} (explain.max_prompt_tokens)", where, "context_length_exceeded")
    if job["target"] is not None:
        target = tok(job["target"], add_special_tokens=False)["input_ids"]
        if len(target) > limits["max_target_tokens"]:
            raise oa.ApiError(400, f"the target has {len(target)} tokens; the limit is {limits['max_target_tokens']} "
                                   "(explain.max_target_tokens)", "target", "context_length_exceeded")
    else:
        target = models.greedy_ids(model, tok, [ids], limits["max_target_tokens"])[0]
        if not target:
            raise oa.ApiError(400, "the model's greedy answer to this prompt is empty (it ends the turn at once); "
                                   "give a 'target' to explain", "target", "empty_answer")
    context = models.max_positions(getattr(model, "config", None))
    if context and len(ids) + len(target) > context:
        raise oa.ApiError(400, f"the prompt ({len(ids)} tokens) and target ({len(target)}) exceed the model's context "
                               f"of {context} tokens", "target", "context_length_exceeded")
    if job["method"] not in EXPLAIN_METHODS:  # the ingress checked it; a direct caller may not have
        raise oa.ApiError(400, f"unknown method {job['method']!r}; choose one of {', '.join(EXPLAIN_METHODS)}", "method")
    found = features(tok, ids, job)
    try:
        result = explain.explain_ids(model, tok, ids, target, job["method"], n_steps=job["n_steps"],
                                     samples=job["samples"], baseline=job["baseline"], evals=job["evals"],
                                     features=found)
    except UserError as e:  # the tokenizer has no token for this baseline, or shap's log odds overflowed
        if str(e).startswith("explain.baseline"):
            raise oa.ApiError(400, f"baseline {job['baseline']!r}: {e}", "baseline") from None
        raise oa.ApiError(400, str(e), "method") from None
    return result | {"target_source": "given" if job["target"] is not None else "greedy answer",
                     "output_text": tok.decode(target, skip_special_tokens=True)}


def _error(e: oa.ApiError) -> dict:
    return {"error": {"status": e.status, "message": e.message, "param": e.param, "code": e.code}}


class ExplainerBase:
    """The Explainer deployment's code; `explainer_deployment` adds the multiplexed loader
    (`get_model`), whose LRU size comes from the config."""

    def __init__(self, args: dict):
        import torch

        torch.set_num_threads(1)
        self.args, self.limits = args, args["explain"]["limits"]
        self.store = None  # the registry, opened on the first registry version

    async def _load(self, version: str) -> Loaded:
        if self.store is None and models.is_registry_ref(version):  # a plain model needs no registry
            self.store = await asyncio.to_thread(registry.open_store, tracking_uri=self.args["tracking_uri"])
        inf = await asyncio.to_thread(models.load, version, dtype="float32", store=self.store)
        return Loaded(inf.model, inf.tokenizer)

    async def answer(self, version: str, job: dict) -> dict:
        """{"result": the attribution result} or {"error": {status, message, param, code}}."""
        try:
            check_installed(job["method"])  # before loading: a missing extra fails at once
            loaded = await self.get_model(version)
            async with loaded.lock:
                result = await asyncio.to_thread(explain_job, loaded.model, loaded.tok, job, self.limits)
        except oa.ApiError as e:
            return _error(e)
        except registry.IntegrityError as e:  # 409, as the Generator answers it (see generator.py)
            return _error(oa.ApiError(409, f"cannot load {version}: {e}", "model", "model_integrity_error"))
        except UserError as e:  # a registry problem (unreachable store, deleted version): the server's
            return _error(oa.ApiError(500, f"cannot load {version}: {e}"))
        return {"result": result}

    async def explain(self, job: dict) -> dict:
        """Per request, through the ingress's handle with `multiplexed_model_id=VERSION`."""
        return await self.answer(serve.get_multiplexed_model_id(), job)


def explainer_deployment(max_models: int):
    """The Explainer deployment class with an LRU of `max_models` versions per replica."""

    class Explainer(ExplainerBase):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, version: str) -> Loaded:
            return await self._load(version)

    return serve.deployment(name="Explainer")(Explainer)
