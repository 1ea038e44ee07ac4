"""`raylab run CONFIG`: the whole pipeline in one command.

    raylab run configs/quickstart.yaml                  # data -> [pretrain] -> tune|train -> ... -> smoke
    raylab run configs/quickstart.yaml --until train    # stop after a stage
    raylab run configs/quickstart.yaml --no-serve       # everything but the endpoint
    raylab run configs/quickstart.yaml --keep-serving   # leave the endpoint up (foreground)
    raylab run configs/quickstart.yaml optimize.quantize=int8_weight_only   # + a quantised version of the promoted one

data -> pretrain (when the config has a `pretrain` section: continued pre-training on the
corpus, whose result becomes the base model) -> tune (when the config has a `tune` section,
else train; either registers the winner as a new version) -> gates (`raylab models
evaluate`) -> promote (when the gates pass and `registry.auto_promote` is true) -> optimize
(when the config sets a method in its `optimize:` section and a version was just promoted: that
version quantised, pruned or distilled into a derived version, which is gated by the same gates
and left for `raylab models promote`; a derived version that fails them is reported in the
summary and production stays the promoted parent) -> index (when `serve.rag` reads the index of
this config's `index:` section: `raylab index`) -> serve (the production
version) -> smoke requests (the held-out questions of `eval.held_out`, else a few of the val
split, and one question of the training set, answered by the endpoint without retrieval and
by the base model; with `serve.rag`, the headline question once more with retrieval) ->
explain (the headline answer's token attributions, with the explain extra) -> a summary,
headed by a held-out question (base vs tuned), the seen question beside it labelled as
recall, the retrieval-augmented answer with its sources, the explained answer's top input
tokens, and the held-out ROUGE-L. Each
stage skips work whose inputs have not changed: the data stage's cache, a finished
pre-training or train run, a sweep's finished trials, an already-registered version, chunks
already embedded.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from raylab.config import RaylabConfig
from raylab.core import audit, cluster, events, runs, storage
from raylab.errors import UserError

log = logging.getLogger(__name__)


STAGES = ("data", "pretrain", "train", "tune", "gates", "promote", "optimize", "index", "serve")


def run(cfg: RaylabConfig, address: str | None = None, until: str | None = None, serve: bool = True,
        keep_serving: bool = False) -> dict:
    """Run the pipeline; returns the summary it prints (also written to <output_dir>/run.json)."""
    if until is not None and until not in STAGES:
        raise UserError(f"--until {until!r}: expected one of {', '.join(STAGES)}")
    if serve and until in (None, "serve") and cfg.registry.enabled and cfg.train.provider == "ray":
        from raylab import serve as serving

        # The serve stage reads the API keys; an unset variable or an empty keys file is
        # exit 2 now, not after the data, training and gates stages.
        serving.api_keys({"api_keys_env": cfg.serve.api_keys_env, "api_keys_file": cfg.serve.api_keys_file})
        if cfg.eval.held_out:  # likewise a missing or malformed held-out file
            from raylab import evaluate

            evaluate.read_input(cfg.eval.held_out, "eval.held_out")
    if optimizing(cfg, until):  # e.g. int4 on a machine without CUDA: exit 2 now, not after training
        from raylab import optimize

        optimize.check_config(cfg)
    summary: dict = {"run": cfg.run_name, "output_dir": cfg.output_dir, "stages": {}}

    def stage(name: str, fn):
        log.info(f"\n=== {name} ===")
        started = time.monotonic()
        out = fn()
        summary["stages"][name] = round(time.monotonic() - started, 1)
        return out

    # One Ray for every stage; an embedded one starts with its dashboard, which Ray Train's
    # state API and Serve's REST API (the serve stage) need.
    cluster.connect(cfg, address, state_api=True)
    with events.stage("run", run=cfg.output_dir, until=until, serve=serve):
        return _run_stages(cfg, address, until, serve, keep_serving, summary, stage)


def _run_stages(cfg, address, until, serve, keep_serving, summary, stage) -> dict:
    # Stages are imported here, not at the top: the CLI imports this module for STAGES alone.
    from raylab import data, train, tune

    try:
        manifest = stage("data", lambda: data.run_data(cfg, address))
        summary["data"] = {k: manifest["counts"].get(k) for k in ("read", "accepted", "rejected", "duplicates")
                           if k in manifest.get("counts", {})}
        if until == "data":
            return _finish(cfg, summary)
        if cfg.pretrain is not None:
            meta = stage("pretrain", lambda: train.run_pretrain(cfg, address))
            summary["pretrain"] = {k: meta.get("metrics", {}).get(k) for k in ("initial_val_loss", "val_loss")}
            if until == "pretrain":
                return _finish(cfg, summary)
        if cfg.tune is not None:
            result = stage("tune", lambda: tune.run_tune(cfg, address))
            best = result.get("best") or {}
            summary["best"] = {"trial": best.get("trial_id"), cfg.tune.metric: best.get(cfg.tune.metric),
                               "params": best.get("params")}
        else:
            result = stage("train", lambda: train.run_train(cfg, address))
            summary["best"] = {"metrics": result.get("metrics")}
            if result.get("fine_tuned_model"):  # train.provider openai_compatible
                summary["remote_model"] = {"model": result["fine_tuned_model"], "base_url": result["base_url"]}
        summary["version"] = result.get("registry")
        if until in ("train", "tune") or not cfg.registry.enabled or not summary["version"]:
            if not cfg.registry.enabled:
                log.info("registry.enabled is false: nothing is registered, gated or served")
            elif not summary["version"]:
                log.info("no model was registered (no trial finished): nothing to gate or serve")
            return _finish(cfg, summary)
        ref = _promote_if_passed(cfg, summary, stage, address, until)
        if summary.get("promoted") and optimizing(cfg, until):
            stage("optimize", lambda: optimize_promoted(cfg, summary, address))
        if indexing(cfg, until):
            stage("index", lambda: index_documents(cfg, summary, address))
        if until in ("gates", "promote", "optimize", "index") or not serve or ref is None:
            return _finish(cfg, summary)
        if "remote_model" in summary:
            log.info(f"serve: {summary['version']['name']}/{summary['version']['version']} was trained at "
                     f"{summary['remote_model']['base_url']}, which serves it as {summary['remote_model']['model']!r}; "
                     "raylab serves only versions whose weights it holds")
            return _finish(cfg, summary)
        _serve_and_smoke(cfg, summary, stage, address, keep_serving)
        return _finish(cfg, summary)
    finally:
        if summary.get("stages"):
            storage.write_text(runs.Run(cfg.output_dir).summary, json.dumps(summary, indent=2, default=str))


def _promote_if_passed(cfg, summary, stage, address, until) -> str | None:
    """Gates, then promotion; the REF to serve (production), or None when there is none."""
    from raylab import evaluate, registry

    store = registry.open_store(cfg)
    name, version = summary["version"]["name"], summary["version"]["version"]
    result = stage("gates", lambda: evaluate.evaluate_version(store, name, version, address))
    summary["gates"] = result["status"]
    if until == "gates":
        return None
    if result["status"] == "passed" and cfg.registry.auto_promote:
        moves = stage("promote", lambda: registry.promote(store, name, version, reason="raylab run: gates passed"))
        for m in moves:
            log.info(f"promote: {name} {m['alias']} {m['from'] if m['from'] is not None else '-'} -> {m['to']}")
        if not moves:
            log.info(f"promote: {name}/{version} is production already")
        summary["promoted"] = f"{name}/{version}"
    elif result["status"] != "passed":
        log.info(f"{name}/{version} failed its gates: production is unchanged (`raylab models show {name}/{version}`)")
    else:
        log.info(f"registry.auto_promote is false: production is unchanged; promote with `raylab models promote {name} {version}`")
    production = registry.registered_model(store, name).aliases.get(registry.PRODUCTION)
    if production is None:
        log.info(f"{name} has no production version yet: nothing to serve")
        return None
    return f"{name}@{registry.PRODUCTION}"


def optimizing(cfg: RaylabConfig, until: str | None) -> bool:
    """Whether this run reaches the optimize stage with a method to apply."""
    opt = cfg.optimize
    reached = until is None or STAGES.index(until) >= STAGES.index("optimize")
    return reached and cfg.registry.enabled and any(m is not None for m in (opt.quantize, opt.prune, opt.distill))


def optimize_promoted(cfg: RaylabConfig, summary: dict, address: str | None = None) -> list[dict]:
    """The optimize stage of `raylab run`: the version just promoted (summary["promoted"],
    NAME/VERSION) goes through `raylab optimize` with this config's `optimize:` section, and
    each derived version through `raylab models evaluate` (its gates: the parent's, with this
    config's max_quality_drop / min_speedup). Sets and returns summary["optimized"]: one entry
    per method, {method, version, derived_from, gates, failures, ...}.

    A derived version is never promoted here: which of parent and derived version serves is
    the operator's call (`raylab models promote NAME VERSION`), and a failed gate leaves the
    parent in production; both outcomes are reported, neither is an error of the run."""
    from raylab import evaluate, optimize, registry

    store = registry.open_store(cfg)
    parent = summary["promoted"]
    result = optimize.run_optimize(cfg, parent, store=store)
    name, version = result["name"], int(result["version"])
    gated = evaluate.evaluate_version(store, name, version, address)
    failures = [c["gate"] for c in gated["checks"] if not c["passed"]]
    entry = {"method": result["method"], "version": f"{name}/{version}", "derived_from": parent,
             "gates": gated["status"], "failures": failures, "val_loss": gated["val_loss"],
             "parameters": result.get("parameters")}
    if "measurements" in result:
        entry["ratios"] = result["measurements"].get("ratios")
    if gated["status"] == "passed":
        log.info(f"optimize: {name}/{version} ({result['method']} of {parent}) passed its gates; production stays "
                 f"{parent}: serve it with `raylab models promote {name} {version}`")
    else:
        log.info(f"optimize: {name}/{version} ({result['method']} of {parent}) failed its gates ({', '.join(failures)}); "
                 f"production stays {parent} (`raylab models show {name}/{version}`)")
    summary["optimized"] = [entry]
    return summary["optimized"]


def indexing(cfg: RaylabConfig, until: str | None) -> bool:
    """Whether this run reaches the index stage: `serve.rag` retrieves from the index this
    config's `index:` section builds (serve.rag.index unset or that directory). The schema
    fills in an `index:` section for every config, so its presence cannot say whether a run
    wants one; serve.rag, the index's reader, does (also with --no-serve: a later `raylab
    serve` reads it)."""
    rag = cfg.serve.rag
    own = rag is not None and rag.index in (None, cfg.index.directory or runs.Run(cfg.output_dir).index)
    return own and (until is None or STAGES.index(until) >= STAGES.index("index"))


def index_documents(cfg: RaylabConfig, summary: dict, address: str | None = None) -> dict:
    """The index stage of `raylab run`: `raylab index` on this config (incremental: a re-run
    embeds only chunks whose text is new). Sets and returns summary["index"]."""
    from raylab import rag

    manifest = rag.run_index(cfg, address)
    counts = manifest.get("counts", {})
    summary["index"] = {"directory": rag.index_directory(cfg), "model": manifest.get("model")} | {
        k: counts[k] for k in ("documents", "chunks", "embedded", "reused") if k in counts}
    return summary["index"]


def _serve_and_smoke(cfg, summary, stage, address, keep_serving) -> None:
    from raylab import serve

    info = stage("serve", lambda: serve.start_serving(cfg, None, address))
    summary["endpoint"] = {"url": info["url"] + "/v1", "model": info["name"], "version": info["model"]}
    try:
        summary["smoke"] = stage("smoke", lambda: smoke(cfg, info))
        summary["held_out_rouge_l"] = rouge(summary["smoke"])
        if cfg.serve.rag is not None:
            summary["rag"] = stage("rag", lambda: rag_smoke(cfg, info))
        summary["explained"] = stage("explain", lambda: explain_headline(cfg, info))
        if keep_serving:
            _print_summary(summary)
            serve.wait_until_stopped()
    finally:
        serve.stop_serving()


def questions(cfg: RaylabConfig, n: int = 3) -> list[dict]:
    """The held-out questions the smoke step asks, with their references: every one of
    `eval.held_out` (up to eval.max_samples), else a few val-split records, else the golden
    prompts."""
    from raylab import evaluate

    if cfg.eval.held_out:
        items = evaluate.read_input(cfg.eval.held_out, "eval.held_out")[: cfg.eval.max_samples]
        return [{"messages": i.get("messages") or [{"role": "user", "content": i.get("prompt") or i["text"]}],
                 "reference": i.get("reference"), "kind": "held_out"} for i in items]
    try:
        items = evaluate.held_out_items(cfg, runs.read_manifest(runs.Run(cfg.output_dir), cfg.source))[:n]
    except (UserError, OSError, KeyError):
        items = []
    if items:
        return [{"messages": i["messages"], "reference": i["reference"], "kind": "held_out"} for i in items]
    return [{"messages": [{"role": "user", "content": g.prompt}], "reference": g.contains, "kind": "golden"}
            for g in cfg.registry.gates.golden[:n]]


def seen_question(cfg: RaylabConfig) -> list[dict]:
    """One question of the training split (its answer was trained on): recall of seen data,
    shown beside the held-out headline, never instead of it."""
    from raylab import evaluate

    try:
        items = evaluate.held_out_items(cfg, runs.read_manifest(runs.Run(cfg.output_dir), cfg.source), split="train")[:1]
    except (UserError, OSError, KeyError):
        return []
    return [{"messages": i["messages"], "reference": i["reference"], "kind": "seen"} for i in items]


def smoke(cfg: RaylabConfig, info: dict) -> list[dict]:
    """Ask the endpoint the held-out questions and one seen question (chat completions,
    greedy), then the base model the same ones; any failed request is an error. With
    `serve.rag` the requests ask for no retrieval: base and tuned answer the same prompt."""
    from raylab import evaluate, registry

    answers = []
    qs = questions(cfg) + seen_question(cfg)
    extra = {"raylab": {"retrieval": False}} if cfg.serve.rag is not None else {}
    for q in qs:
        body = {"model": info["name"], "messages": q["messages"], "temperature": 0, "max_tokens": cfg.eval.max_new_tokens}
        started = time.monotonic()
        reply = _chat(cfg, info, body | extra)
        answer = reply["choices"][0]["message"]["content"]
        answers.append({"question": q["messages"][-1]["content"], "kind": q["kind"], "answer": answer,
                        "reference": q.get("reference"), "latency_s": round(time.monotonic() - started, 3)})
    # Before/after: the same questions answered greedily by the version's base model.
    path = registry.fetch(registry.open_store(cfg), info["model"])
    for a, before in zip(answers, evaluate.answers(cfg, path, path, qs, base=True), strict=True):
        a["base_answer"] = before
    for a in answers[:3]:
        log.info(f"Q ({_LABELS[a['kind']]}): {a['question']}\n  base:  {a['base_answer']}\n  tuned: {a['answer']}\n"
                 f"  corpus: {a['reference']}")
    if len(answers) > 3:
        log.info(f"... {len(answers) - 3} more in {runs.Run(cfg.output_dir).summary}")
    return answers


def _chat(cfg: RaylabConfig, info: dict, body: dict) -> dict:
    """One chat completion from the endpoint, with the first API key; an HTTP error is exit 2."""
    from raylab import serve

    keys = sorted(serve.api_keys({"api_keys_env": cfg.serve.api_keys_env, "api_keys_file": cfg.serve.api_keys_file}))
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {keys[0]}"} if keys else {})
    req = urllib.request.Request(info["url"] + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise UserError(f"smoke request to {info['url']} failed: HTTP {e.code} {e.read().decode()[:500]}") from None


def rag_smoke(cfg: RaylabConfig, info: dict) -> dict | None:
    """The retrieval-augmented answer of the summary: the headline held-out question (the first
    of `questions`) asked once more with retrieval on (`raylab.retrieval: true`, whatever
    serve.rag.by_default says), so it reads beside the same question answered without it.
    None when there is no question to ask."""
    qs = questions(cfg)[:1]
    if not qs:
        return None
    body = {"model": info["name"], "messages": qs[0]["messages"], "temperature": 0,
            "max_tokens": cfg.eval.max_new_tokens, "raylab": {"retrieval": True}}
    entry = rag_entry(qs[0], _chat(cfg, info, body))
    log.info("\n".join(rag_lines(entry)))
    return entry


def rag_entry(question: dict, reply: dict) -> dict:
    """The summary's record of one retrieval-augmented chat reply: question, answer, reference
    and the sources the endpoint returned (`raylab.sources`, best first)."""
    sources = (reply.get("raylab") or {}).get("sources") or []
    return {"question": question["messages"][-1]["content"], "answer": reply["choices"][0]["message"]["content"],
            "reference": question.get("reference"),
            "sources": [{"origin": s.get("origin") or s.get("source"), "source": s.get("source"),
                         "score": round(float(s["score"]), 3), "text": s.get("text")} for s in sources]}


def rag_lines(entry: dict) -> list[str]:
    """The console lines of a retrieval-augmented answer: question, answer, then each source's
    document and score, best first."""
    lines = [f"with retrieval (serve.rag): {entry['question']}", f"  answer:  {entry['answer']}"]
    if entry.get("reference"):
        lines.append(f"  corpus:  {entry['reference']}")
    if not entry["sources"]:
        return [*lines, "  sources: none (the index returned no chunk)"]
    return lines + [f"  source [{i}]: {s['origin']} (score {s['score']:.3f})" for i, s in enumerate(entry["sources"], 1)]


def explain_headline(cfg: RaylabConfig, info: dict) -> dict | None:
    """The summary's explained answer: the headline held-out question (the first of
    `questions`) answered by the served version, with the prompt tokens its answer came from
    (raylab.explain: eval.global_explanation's method, feature ablation by default, a forward
    pass per prompt token). None when there is no question; {skipped: why} without the explain
    extra (captum), which is no reason to fail a run that trained and served."""
    from raylab import explain, registry

    qs = questions(cfg)[:1]
    if not qs:
        return None
    try:
        explain.captum_attr()
    except UserError as e:
        log.info(f"explain: skipped: {e}")
        return {"question": qs[0]["messages"][-1]["content"], "skipped": str(e)}
    entry = explain.explain_answer(cfg, info["model"], {"messages": qs[0]["messages"], "id": "headline"},
                                   store=registry.open_store(cfg))
    entry = {"question": qs[0]["messages"][-1]["content"]} | entry
    log.info("\n".join(explained_lines(entry)))
    return entry


def explained_lines(entry: dict, k: int = 5) -> list[str]:
    """The console lines of an explained answer: the question, the answer explained, its top-k
    prompt tokens by share of the attribution (with their part of the prompt), the shares by part."""
    if entry.get("skipped"):
        return [f"explained: {entry['question']}: skipped ({entry['skipped']})"]
    tokens = ", ".join(f"{t['token']!r} ({t['part']}) {t['share']:.2f}" for t in entry["top_tokens"][:k])
    by_part = ", ".join(f"{p} {c['attribution_share']:.0%}" for p, c in entry["parts"].items() if c["token_share"])
    return [f"explained ({entry['method']}, {entry['model']}, {entry['seconds']:.1f} s): {entry['question']}",
            f"  answer:  {entry['output_text']!r}", f"  top input tokens: {tokens}", f"  by prompt part: {by_part}"]


_LABELS = {"held_out": "held out: not in the training data", "golden": "a golden prompt",
           "seen": "recall of seen data: from the training set"}


def rouge(answers: list[dict]) -> dict | None:
    """Mean ROUGE-L of base and tuned answers over the held-out questions with a reference."""
    from raylab import evaluate

    held = [a for a in answers if a["kind"] == "held_out" and isinstance(a.get("reference"), str)]
    if not held:
        return None
    items = [{"reference": a["reference"]} for a in held]
    return {"questions": len(held), "base": round(evaluate.score([a["base_answer"] for a in held], items)["rouge_l"], 3),
            "tuned": round(evaluate.score([a["answer"] for a in held], items)["rouge_l"], 3)}


def _finish(cfg: RaylabConfig, summary: dict) -> dict:
    _print_summary(summary)
    return summary


def audit_summary() -> dict | None:
    """The audit chain's state for the summary (None when the audit log is off): verified or
    not, with the first problem `raylab audit verify` would name."""
    settings = audit.Settings.from_env()
    if not settings.enabled:
        return None
    try:
        report = audit.verify(settings)
    except UserError as e:
        return {"verified": False, "error": str(e)}
    out = {"verified": report.ok, "entries": report.entries, "checkpoints": report.checkpoints}
    if not report.ok:
        out["first_problem"] = report.problems[0].message
    return out


def _print_summary(summary: dict) -> None:
    if "audit" not in summary:
        summary["audit"] = audit_summary()
    log.info("\n=== summary ===")
    # The headline: a question the model never saw, base vs tuned; a seen one beside it, as recall.
    smoke_answers = summary.get("smoke", [])
    shown = [a for a in smoke_answers if a["kind"] != "seen"][:1] + [a for a in smoke_answers if a["kind"] == "seen"][:1]
    for a in shown:
        log.info(f"{_LABELS[a['kind']]}: {a['question']}\n  base:  {a.get('base_answer')}\n  tuned: {a['answer']}\n"
                 f"  corpus: {a['reference']}")
    if summary.get("rag"):
        for line in rag_lines(summary["rag"]):
            log.info(line)
    if summary.get("explained"):
        for line in explained_lines(summary["explained"]):
            log.info(line)
    if summary.get("held_out_rouge_l"):
        r = summary["held_out_rouge_l"]
        log.info(f"held-out ROUGE-L over {r['questions']} question(s): base {r['base']:.2f} -> tuned {r['tuned']:.2f}")
    log.info("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stages"].items()))
    if "data" in summary:
        log.info("data: " + ", ".join(f"{k} {v}" for k, v in summary["data"].items()))
    if summary.get("index"):
        i = summary["index"]
        log.info(f"index: {i.get('documents')} documents -> {i.get('chunks')} chunks ({i.get('embedded')} embedded) "
                 f"in {i['directory']}")
    if summary.get("pretrain"):
        p = summary["pretrain"]
        log.info(f"pretrain: val loss {p['initial_val_loss']:.3f} -> {p['val_loss']:.3f} (every token; the stand-in base)")
    if summary.get("best"):
        log.info(f"best: {json.dumps(summary['best'], default=str)[:300]}")
    if summary.get("version"):
        log.info(f"version: {summary['version'].get('name')}/{summary['version'].get('version')}"
            f" (gates: {summary.get('gates', 'not run')}{', promoted' if summary.get('promoted') else ''})")
    for o in summary.get("optimized", []):
        log.info(f"optimized: {o['version']} = {o['method']} of {o['derived_from']} (gates: {o['gates']}"
                 + (f": {', '.join(o['failures'])} failed; production unchanged" if o["failures"] else "") + ")")
    if summary.get("endpoint"):
        log.info(f"endpoint: {summary['endpoint']['url']} (model {summary['endpoint']['model']} -> {summary['endpoint']['version']})")
    if summary.get("audit"):
        a = summary["audit"]
        log.info(f"audit: chain verified, {a['entries']} entries, {a['checkpoints']} signed checkpoints" if a["verified"]
                 else f"audit: NOT verified: {a.get('first_problem') or a.get('error')} (see `raylab audit verify`)")
