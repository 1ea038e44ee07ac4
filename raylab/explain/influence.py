"""`raylab explain CONFIG --model REF --prompt TEXT --influence`: which training records shaped
an answer. An APPROXIMATION (TracIn, tracin.py): the records whose loss gradients on the LoRA
parameters align most with the answer's, at the version's saved checkpoints weighted by the
learning rate applied between them; it says which records push the weights the way the
answer does, not what the model would answer without them (that needs retraining).

    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "Who approves refunds?" --influence
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "..." --target "Finance." \
        --influence --top 10 --checkpoints final --json

    from raylab.explain import run_influence
    run_influence(cfg, "acme-assistant/3", "Who approves refunds?")
    # -> {"approximation", "answer", "checkpoints", "records": [{rank, score, cosine, source, record_id, text}]}

Steps: check the request; load REF (a LoRA adapter; full fine-tunes are refused: scoring
every weight is what the adapter restriction avoids); check that CONFIG's run directory holds
the data REF was trained on (its raylab_train.json names the data manifest's hash); pick the
checkpoints (`--checkpoints`, explain.influence.checkpoints) among those beside the version's
latest checkpoint when that training run is still there, else the version's own weights only,
and say so; score every document of the packed train shards with Ray Data (an actor pool of
`tracin.Scorer`, one torch thread per CPU); keep the top k; join them to data/records/ (the
redacted text, source and record id) by re-tokenizing the candidates of the same length with
the data stage's own encoding.
"""

from __future__ import annotations

import heapq
import logging
import os
import time

from raylab import models, registry
from raylab.config import RaylabConfig
from raylab.core import cluster, runs, storage
from raylab.errors import UserError
from raylab.explain import stage, tracin

log = logging.getLogger(__name__)

APPROXIMATION = ("APPROXIMATION: TracIn-style influence (Pruthi et al. 2020): dot products of loss gradients on the "
                 "LoRA parameters only, at {n} checkpoint(s), weighted by the learning rate applied before each. A high "
                 "score means a record pushed the adapter the way this answer pulls it; it is not proof that the "
                 "answer comes from that record, and records can matter in ways gradients at these points miss.")
FINAL_ONLY = ("only the version's own (final) weights were used{why}: TracIn at one checkpoint is plain gradient "
              "similarity, which weighs the end of training only")


# ---------------------------------------------------------------- checkpoints


def _train_meta(path: str) -> runs.TrainMeta | None:
    meta = runs.model_file(path, runs.TRAIN_META)
    return runs.read_json(meta, runs.TrainMeta) if storage.exists(meta) else None


def saved_checkpoints(meta: runs.TrainMeta | None) -> tuple[list[dict], str]:
    """The verified checkpoints of the run that trained the version (by step), or [] and why not."""
    from raylab import train

    if meta is None:
        return [], f" (the version has no {runs.TRAIN_META}, so its training run is unknown)"
    train_dir = os.path.dirname(meta.latest_checkpoint.rstrip("/"))
    ident = runs.train_identity_in(train_dir)
    if not os.path.isdir(train_dir) or not os.path.exists(ident):
        return [], f" (its training run {train_dir} is not on this machine)"
    import json

    if json.loads(storage.read_text(ident)).get("identity", {}).get("hash") != meta.identity:
        return [], f" ({train_dir} now holds another training run)"
    found = []
    for name in sorted(os.listdir(train_dir)):
        directory = os.path.join(train_dir, name)
        if not (name.startswith("checkpoint_") and os.path.isdir(directory)):
            continue
        if bad := train.checkpoint_problems(directory):
            log.warning(f"explain: skipping {directory}: {'; '.join(bad)}")
            continue
        state = train.checkpoint_state(directory)
        found.append({"name": name, "step": int(state["step"]), "history": state.get("history", []),
                      "model_dir": os.path.join(directory, train.CHECKPOINT_MODEL_DIR)})
    found.sort(key=lambda c: c["step"])
    return found, "" if found else f" ({train_dir} keeps no verified checkpoint)"


def lr_weights(chosen: list[dict]) -> list[float]:
    """Each checkpoint's weight: the learning rate summed over the steps since the previous
    chosen checkpoint (TracIn-CP's step size between checkpoints), from the rates recorded in
    its state (metrics rows every train.log_every steps: their mean times the steps)."""
    out, prev = [], 0
    for c in chosen:
        rates = [r["lr"] for r in c["history"] if prev < r.get("step", 0) <= c["step"] and r.get("lr") is not None]
        out.append(sum(rates) / len(rates) * (c["step"] - prev) if rates else 0.0)
        prev = c["step"]
    return out


def choose(available: list[dict], spec: str) -> list[dict]:
    """explain.influence.checkpoints: all | final | names or steps, comma-separated."""
    spec = spec.strip()
    if spec in ("all", "final"):
        return list(available) if spec == "all" else []
    picked = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        match = [c for c in available if item in (c["name"], str(c["step"]))]
        if not match:
            names = ", ".join(f"{c['name']} (step {c['step']})" for c in available) or "none"
            raise UserError(f"--checkpoints / explain.influence.checkpoints: no saved checkpoint {item!r}; "
                            f"saved: {names}; or use all or final")
        picked.extend(m for m in match if m not in picked)
    return sorted(picked, key=lambda c: c["step"])


def checkpoint_plan(meta: runs.TrainMeta | None, spec: str) -> tuple[list[dict], str | None]:
    """([{name, step, model_dir, weight}], a note when only the final weights are used)."""
    available, why = saved_checkpoints(meta)
    chosen = choose(available, spec) if available else []
    if not available and spec not in ("all", "final"):
        raise UserError(f"--checkpoints {spec}: no saved checkpoints to choose from{why}; use all or final")
    if not chosen:
        return [{"name": "final", "step": meta.steps if meta else None, "model_dir": None, "weight": 1.0}], \
            FINAL_ONLY.format(why=why or " (as asked)")
    plan = [{"name": c["name"], "step": c["step"], "model_dir": c["model_dir"], "weight": w}
            for c, w in zip(chosen, lr_weights(chosen), strict=True)]
    if not any(p["weight"] for p in plan):
        raise UserError(f"--checkpoints {spec}: the chosen checkpoints record no learning rate; choose others")
    return plan, None


# ---------------------------------------------------------------- the training side


def _check_data(cfg: RaylabConfig, meta: runs.TrainMeta | None, ref: str) -> runs.DataManifest:
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source)
    if meta is not None and meta.data_manifest_hash != runs.manifest_hash(manifest):
        raise UserError(f"--model {ref} was trained on other data than {run.data} holds (data manifest hash "
                        f"{meta.data_manifest_hash[:12]} vs {runs.manifest_hash(manifest)[:12]}); give the CONFIG "
                        "(output_dir) of the run that trained it")
    return manifest


def score_documents(cfg: RaylabConfig, path: str, location: str, plan: list[dict], q_ids: list[int],
                    q_labels: list[int], k: int, address: str | None = None) -> tuple[list[dict], int]:
    """(the top k documents by score, how many were scored): Ray Data over the packed shards."""
    inf = cfg.explain.influence
    cluster.connect(cfg, address)
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    sealed = storage.parquet_sealed(location)
    shards = storage.read_parquet(location) if sealed else ray.data.read_parquet(location)
    scored = shards.select_columns(["input_ids", "labels", "segment_ids"]).map_batches(
        tracin.Scorer, batch_format="pyarrow", batch_size=inf.batch_size, num_cpus=inf.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=inf.actors),
        fn_constructor_kwargs={"path": path, "checkpoints": plan, "query_ids": q_ids, "query_labels": q_labels,
                               "threads": max(1, int(inf.cpus_per_actor)), "all_tokens": cfg.train.loss_on == "all"})
    by = "cosine" if inf.normalize else "score"
    top, n = [], 0
    for batch in scored.iter_batches(batch_format="pyarrow"):
        rows = batch.to_pylist()
        n += len(rows)
        top = heapq.nlargest(k, top + rows, key=lambda r: r[by])
    return top, n


def attach_records(cfg: RaylabConfig, tok, top: list[dict]) -> list[dict]:
    """Each top document with the records it is (source, record_id, redacted text): the train
    records of the same length, encoded as the data stage encoded them, matched by token ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from raylab.data import encode_documents

    location = runs.Run(cfg.output_dir).split("records")
    table = storage.read_table(location, ["source", "record_id", "text", "messages", "split", "num_tokens"])
    lengths = pa.array(sorted({r["tokens"] for r in top}), type=table["num_tokens"].type)
    table = table.filter(pc.and_(pc.equal(table["split"], "train"), pc.is_in(table["num_tokens"], value_set=lengths)))
    rows = table.to_pylist()
    encoded = encode_documents(tok, [r["text"] or "" for r in rows], [r["messages"] or "" for r in rows],
                               cfg.data.train_on_prompt) if rows else []
    limit = cfg.data.validation.max_tokens or cfg.data.max_seq_len
    by_key: dict[str, list[dict]] = {}
    for r, (ids, _) in zip(rows, encoded, strict=True):
        by_key.setdefault(tracin.doc_key(ids[:limit]), []).append(r)
    out = []
    for rank, doc in enumerate(top, start=1):
        found = by_key.get(doc["key"], [])
        out.append({"rank": rank, "score": doc["score"], "cosine": doc["cosine"], "tokens": doc["tokens"],
                    "per_checkpoint_dot": doc["dots"], "gradient_norms": doc["norms"],
                    "records": [{"source": r["source"], "record_id": r["record_id"],
                                 "text": r["text"] or r["messages"]} for r in found]})
        if not found:
            log.warning(f"explain: the document ranked {rank} matches no train record in {location} "
                        "(the records were rewritten after training?)")
    return out


# ---------------------------------------------------------------- the verb


def _load_adapter(model_ref: str, store) -> models.Inference:
    inf = models.load(model_ref, dtype="float32", store=store)
    if inf.kind != "adapter" or not tracin.trained_names(inf.model):
        raise UserError(f"--influence: {model_ref} is a {inf.kind} model, not a LoRA adapter; influence is computed "
                        "on the adapter's parameters (scoring every weight of a full model is what it avoids)")
    return inf


def run_influence(cfg: RaylabConfig, model_ref: str, prompt: str | None = None, target: str | None = None, *,
                  messages: list | None = None, completion: bool = False, top_k: int | None = None,
                  checkpoints: str | None = None, address: str | None = None,
                  store: registry.Store | None = None) -> dict:
    """The top-k training records behind `model_ref`'s answer to `prompt` (or `messages`):
    {approximation, model, prompt, answer, answer_source, checkpoints, note, ranked_by, documents_scored,
    records: [{rank, score, cosine, tokens, records: [{source, record_id, text}]}], seconds}."""
    inf_cfg = cfg.explain.influence
    k = top_k if top_k is not None else inf_cfg.top_k
    if k < 1:
        raise UserError(f"--top {k}: must be at least 1")
    item = stage.prompt_item(prompt, messages, completion)
    if target is not None and not target.strip():
        raise UserError("--target: empty; leave it out to explain the model's own greedy answer")
    started = time.perf_counter()
    inf = _load_adapter(model_ref, store)
    meta = _train_meta(inf.path)
    manifest = _check_data(cfg, meta, model_ref)
    plan, note = checkpoint_plan(meta, checkpoints or inf_cfg.checkpoints)
    tok = inf.tokenizer
    ids = models.prompt_ids(tok, item, "--messages")
    if target is not None:
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
    else:
        target_ids = models.greedy_ids(inf.model, tok, [ids], cfg.explain.max_target_tokens)[0]
        if not target_ids:
            raise UserError(f"--target: {model_ref}'s greedy answer is empty; give --target TEXT to explain")
    inf.model = None  # the actors load their own copies
    q_ids, q_labels = tracin.query(ids, target_ids)
    log.info(f"explain: influence of the train split's documents on a {len(target_ids)}-token answer at "
             f"{len(plan)} checkpoint(s) ({', '.join(p['name'] for p in plan)})")
    top, n = score_documents(cfg, inf.path, manifest.outputs["train"], plan, q_ids, q_labels, k, address)
    return {"approximation": APPROXIMATION.format(n=len(plan)), "note": note, "model": inf.ref or model_ref,
            "prompt": tok.decode(ids), "answer": tok.decode(target_ids, skip_special_tokens=True),
            "answer_source": "given" if target is not None else "greedy answer",
            "checkpoints": [{k_: p[k_] for k_ in ("name", "step", "weight")} for p in plan],
            "ranked_by": "cosine" if inf_cfg.normalize else "score", "documents_scored": n,
            "records": attach_records(cfg, tok, top), "seconds": time.perf_counter() - started}


def summary(result: dict, width: int = 100) -> str:
    """What `raylab explain --influence` prints: the approximation first, then the ranking."""
    cks = ", ".join(f"{c['name']}" + (f" (step {c['step']}, weight {c['weight']:.3g})" if c["step"] is not None else "")
                    for c in result["checkpoints"])
    lines = [result["approximation"]] + ([f"NOTE: {result['note']}."] if result["note"] else []) + [
        f"{result['model']}: answer ({result['answer_source']}) {result['answer']!r}",
        f"checkpoints: {cks}; {result['documents_scored']} training documents scored in {result['seconds']:.1f} s, "
        f"ranked by {result['ranked_by']}"]
    for r in result["records"]:
        who = "; ".join(f"{x['source']} record {x['record_id']}" for x in r["records"]) or "(no matching record)"
        text = r["records"][0]["text"] if r["records"] else ""
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"  {r['rank']:>2}. score {r['score']:+.4g} cosine {r['cosine']:+.3f}  {who}: {text!r}")
    return "\n".join(lines)
