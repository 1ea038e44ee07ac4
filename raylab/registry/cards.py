"""Model cards: what a registered version is, what it was trained on and with how much compute.

    raylab models card acme-assistant/3                  # the Markdown card
    raylab models card acme-assistant@production --json  # the same facts as JSON
    raylab models card acme-assistant/3 --output cards/  # write README.md + model_card.json

Every version `versions.register` creates gets a card, logged as artifacts of its MLflow run
under `card/`: `README.md` (Hugging Face model-card format: YAML front matter that
`huggingface_hub.ModelCard.load` reads, then Markdown) and `model_card.json` (the same facts,
for scripts). Built from the typed stage outputs only: the train stage's `TrainMeta`, the data
stage's `DataManifest`, the resolved config (`governance.card` says what no output knows:
intended and out-of-scope use, licence, authors, contact).

Gate results arrive after registration: `raylab models evaluate` re-logs the card
(`refresh`), and reading a card always takes the gates from the version's tags, which are
the registry's record, so a card never shows stale gates.

Extension (later issues: optimisation, explainability): a stage adds its own section with

    registry.add_card_section(store, "acme-assistant", 3, "Explanations", markdown)

which stores it in the JSON's `extra_sections` ({title: markdown}, in insertion order) and
re-logs both files; `render` prints them after the standard sections, in that order.

Versions registered before cards existed have no `card/` artifact: `card_for` builds one on
the fly from what the version's run recorded (its resolved config, manifest and the model's
`raylab_train.json`, all MLflow artifacts) and says so in the card; nothing is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.version import __version__

SCHEMA = 1
# The EU AI Act GPAI guidelines: a modification is a new general-purpose model when its
# training compute exceeds one third of the original model's.
GPAI_SHARE = 1 / 3
UNKNOWN = "unknown"


# ---------------------------------------------------------------- the facts


def base_parameters(cfg: RaylabConfig, base_path: str | None) -> tuple[int | None, str]:
    """The base model's parameter count and where it came from: the tensor shapes in a local
    safetensors checkpoint (headers only, no weights loaded), else governance.card.base_parameters."""
    if base_path and os.path.isdir(base_path):
        files = [os.path.join(base_path, f) for f in sorted(os.listdir(base_path)) if f.endswith(".safetensors")
                 and not f.startswith("adapter_")]
        if files:
            from safetensors import safe_open

            n = 0
            with storage.plain_dir(base_path) as plain:
                for f in [os.path.join(plain, os.path.basename(f)) for f in files]:
                    with safe_open(f, framework="np") as st:
                        for key in st.keys():
                            shape = st.get_slice(key).get_shape()
                            size = 1
                            for d in shape:
                                size *= d
                            n += size
            return n, f"counted from the base checkpoint's safetensors ({len(files)} file(s))"
    if cfg.governance.card.base_parameters is not None:
        return cfg.governance.card.base_parameters, "governance.card.base_parameters"
    return None, UNKNOWN


def _pretrain_meta(cfg: RaylabConfig, base_path: str | None = None) -> runs.TrainMeta | None:
    """The base's whole pre-training, when raylab did it from random weights: with
    `pretrain.tokenizer`, the pretrain run's TrainMeta; when the base is a model raylab trained
    (its TrainMeta beside it) from a preset raylab built with random weights (the preset's
    marker beside that), the base's own TrainMeta. The second is how a sweep's trials see the
    quickstart's pre-trained base: their configs name it by path, with no pretrain section."""
    if cfg.pretrain is not None and cfg.pretrain.tokenizer is not None:
        location = runs.Run(cfg.output_dir).pretrain.train_meta
        return runs.read_json(location, runs.TrainMeta) if storage.exists(location) else None
    if base_path and storage.exists(runs.model_file(base_path, runs.TRAIN_META)):
        meta = runs.read_json(runs.model_file(base_path, runs.TRAIN_META), runs.TrainMeta)
        if meta.base_model_path and storage.exists(runs.model_file(meta.base_model_path, runs.PRESET_MARKER)):
            return meta
    return None


def eu_ai_act(cfg: RaylabConfig, fine_tune_flops: float, n_base: int | None, pre: runs.TrainMeta | None
              ) -> dict[str, Any]:
    """The fine-tune's compute against one third of the base's estimated pre-training compute
    (`pre`: the base's whole pre-training when raylab did it, `_pretrain_meta`)."""
    tokens = cfg.governance.card.base_pretraining_tokens
    if pre is not None:
        base_flops: float | None = pre.estimated_training_flops
        basis = (f"the base was pre-trained from random weights by this run's pretrain stage: {pre.trained_tokens:,} "
                 f"tokens, {pre.estimated_training_flops:.3g} FLOPs ({pre.flops_formula})")
    elif tokens is not None and n_base is not None:
        base_flops = 6 * n_base * tokens
        basis = f"6*N*D with N = {n_base:,} base parameters and D = {tokens:.3g} pre-training tokens (governance.card)"
    else:
        base_flops = None
        missing = [k for k, v in (("the base's pre-training token count (governance.card.base_pretraining_tokens)", tokens),
                                  ("the base's parameter count", n_base)) if v is None]
        basis = "unknown: " + " and ".join(missing) + " not known"
    out: dict[str, Any] = {"fine_tune_flops": fine_tune_flops, "base_pretraining_flops": base_flops, "basis": basis,
                           "threshold_share": GPAI_SHARE}
    if base_flops is None:
        out |= {"threshold_flops": None, "ratio": None, "exceeds_threshold": None,
                "statement": "Unknown: the base model's pre-training compute is not known, so whether this fine-tune "
                             "exceeds one third of it cannot be said."}
    else:
        threshold = base_flops * GPAI_SHARE
        ratio = fine_tune_flops / base_flops
        exceeds = fine_tune_flops > threshold
        out |= {"threshold_flops": threshold, "ratio": ratio, "exceeds_threshold": exceeds,
                "statement": (f"The fine-tune used {fine_tune_flops:.3g} FLOPs, {ratio:.3g} of the base's estimated "
                              f"{base_flops:.3g}: {'above' if exceeds else 'below'} the one-third threshold "
                              f"({threshold:.3g} FLOPs) of the EU AI Act's guidelines for general-purpose models"
                              + (", so the modified model would count as a new general-purpose model." if exceeds else "."))}
    return out


def data_section(manifest: runs.DataManifest | None) -> dict[str, Any] | None:
    """Provenance from the data manifest: each source with its files' sha256 and counts."""
    if manifest is None:
        return None
    c = manifest.counts
    sources = []
    for i in manifest.inputs:
        counts = manifest.by_source.get(i["name"], {})
        sources.append({"name": i["name"], "type": i["type"], "location": i.get("location"),
                        "files": [{"path": f["path"], "sha256": f["sha256"]} for f in i.get("files", [])],
                        **({"query": i["query"]} if i.get("query") else {}),
                        **{k: int(counts.get(k, 0)) for k in ("read", "accepted", "rejected", "duplicates", "erased")}})
    return {"manifest_hash": runs.manifest_hash(manifest), "created": manifest.created, "sources": sources,
            "counts": {"read": c.read, "accepted": c.accepted, "rejected": c.rejected,
                       "deduplicated": sum(c.duplicates.values()), "duplicates": dict(c.duplicates),
                       "erased": runs.erased_count(c)},
            "rejected_by_reason": dict(c.rejected_by_reason), "pii_found": dict(manifest.pii_redactions),
            "splits": {s: {"documents": t.documents, "tokens": t.tokens, "target_tokens": t.target_tokens,
                           "sequences": t.sequences} for s, t in (("train", manifest.tokens.train), ("val", manifest.tokens.val))},
            "tokenizer": manifest.tokenizer.get("fingerprint")}


def hyperparameters(cfg: RaylabConfig, tuned: dict[str, Any] | None) -> dict[str, Any]:
    t, m = cfg.train, cfg.model
    out: dict[str, Any] = {"method": m.method, "lr": t.lr, "weight_decay": t.weight_decay, "epochs": t.epochs,
                           "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                           "warmup_ratio": t.warmup_ratio, "schedule": t.schedule, "max_grad_norm": t.max_grad_norm,
                           "objective": t.objective, "loss_on": t.loss_on, "max_seq_len": cfg.data.max_seq_len}
    if m.method != "full":
        out |= {"lora.r": m.lora.r, "lora.alpha": m.lora.alpha, "lora.dropout": m.lora.dropout,
                "lora.target_modules": list(m.lora.target_modules)}
    for key, value in (tuned or {}).items():  # the sweep's winning trial: its sampled values
        out[key.removeprefix("train.").removeprefix("model.")] = value
    return out


def build(cfg: RaylabConfig, meta: dict, manifest: runs.DataManifest | None, *, name: str, version: int | str,
          run_id: str, stage: str = "train", tuned: dict[str, Any] | None = None, note: str | None = None) -> dict:
    """The card's facts as a JSON-able dict (`render` turns it into the Markdown card)."""
    card = cfg.governance.card
    n_base, n_source = base_parameters(cfg, meta.get("base_model_path"))
    tokens = int(meta.get("trained_tokens") or 0)
    flops = float(meta.get("estimated_training_flops") or 0.0)
    world = int(meta.get("world_size") or 1)
    seconds = float(meta.get("train_seconds") or 0.0)
    gpus = cfg.train.gpus_per_worker
    base = meta.get("base_model") or cfg.model.name_or_path
    pre = _pretrain_meta(cfg, meta.get("base_model_path"))
    pretrained = pre is not None
    preset = "pretrained" if pretrained else ("preset" if base.startswith("preset:") else None)
    licence = card.license or (cfg_license() if preset else UNKNOWN)
    remote = _remote(meta)
    if remote:  # the provider's base and compute are not raylab's model section's: say unknown, not 0
        n_base, n_source, flops = None, "unknown: the provider's base model", None
    eu = eu_ai_act(cfg, flops, n_base, pre) if flops is not None else {
        "fine_tune_flops": None, "base_pretraining_flops": None, "basis": "unknown: trained at a remote provider",
        "threshold_share": GPAI_SHARE, "threshold_flops": None, "ratio": None, "exceeds_threshold": None,
        "statement": "Unknown: the provider trained it and reported no training compute, so whether this fine-tune "
                     "exceeds one third of the base's pre-training compute cannot be said here."}
    return {
        "schema": SCHEMA, "name": name, "version": int(version), "run_id": run_id, "stage": stage,
        "created": meta.get("created"), "note": note,
        "base_model": {"name": base, "path": meta.get("base_model_path"), "parameters": n_base,
                       "parameters_source": n_source, "built_by_raylab": preset},
        "license": {"id": licence, "source": "governance.card.license" if card.license else
                    ("raylab's: the base is a preset raylab builds" if preset else
                     "not stated: set governance.card.license")},
        "intended_use": card.intended_use, "out_of_scope_use": card.out_of_scope_use,
        "authors": list(card.authors), "contact": card.contact,
        "data": data_section(manifest),
        "training": {"hyperparameters": remote["hyperparameters"] if remote else hyperparameters(cfg, tuned), "seed": cfg.train.seed, "data_seed": cfg.data.seed,
                     "steps": meta.get("steps"), "epochs_started": meta.get("epochs_started"),
                     "stopped_early": meta.get("stopped_early"), "trained_tokens": tokens, "world_size": world,
                     "dtype": meta.get("dtype"), "precision": meta.get("precision"),
                     "data_manifest_hash": meta.get("data_manifest_hash"), "config_hash": meta.get("config_hash")},
        "code_version": {"raylab": __version__, "recorded": meta.get("code_version")},
        "evaluation": {"metrics": {k: v for k, v in (meta.get("metrics") or {}).items() if v is not None},
                       "gates": {"status": "pending", "checks": []}},
        "compute": {"training_flops": flops, "flops_formula": meta.get("flops_formula"),
                    "six_n_d": 6 * n_base * tokens if n_base else None,
                    "six_n_d_formula": "6*N*D, N = all base parameters, D = trained tokens (the standard estimate)",
                    "wall_seconds": seconds, "device_seconds": None if remote else round(seconds * world * (gpus if gpus > 0 else 1), 1),
                    "device_type": "the provider's hardware (not reported)" if remote else
                    (f"GPU ({gpus:g} per worker)" if gpus > 0 else "CPU"),
                    "workers": world},
        "remote": remote,
        "eu_ai_act": eu,
        "extra_sections": {},
    }


def _remote(meta: dict) -> dict | None:
    """A remote version's provider facts (train/remote.py's pointer), else None."""
    if not meta.get("provider"):
        return None
    return {"provider": meta["provider"], "base_url": meta.get("base_url"), "job": meta.get("job"),
            "fine_tuned_model": meta.get("fine_tuned_model"), "files": meta.get("files") or {},
            "withheld": meta.get("withheld") or {}, "metrics_source": meta.get("metrics_source"),
            "hyperparameters": {"method": f"{meta.get('method') or 'remote'} (the provider's own)",
                                **(meta.get("provider_hyperparameters") or meta.get("hyperparameters") or {})}}


def _remote_lines(remote: dict | None) -> list[str]:
    if not remote:
        return []
    sent = ", ".join(f"{split}: {f['records']:,} records (sha256 {f['sha256'][:16]}...)" for split, f in remote["files"].items())
    withheld = ", ".join(f"{k} ({v:,})" for k, v in remote["withheld"].items()) or "none"
    return ["## Remote provider", "",
            f"- Trained by {remote['provider']} at {remote['base_url']}, job `{remote['job']}`; its weights stay "
            f"there, served as `{remote['fine_tuned_model']}`",
            f"- Sent: {sent}", f"- Withheld (sources marked contains_pii): {withheld}",
            f"- Metrics: {remote['metrics_source'] or UNKNOWN}", ""]


def cfg_license() -> str:
    """raylab's own licence (pyproject's `license`), as a Hugging Face licence id."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        text = metadata("raylab").get("License-Expression") or metadata("raylab").get("License") or ""
    except PackageNotFoundError:
        text = ""
    return text.lower() or "apache-2.0"


def with_gates(card: dict, tags: dict[str, str]) -> dict:
    """The card with the version's gate result and held-out metrics as the registry records
    them now (tags written by `raylab models evaluate`)."""
    report = json.loads(tags["raylab.gates.report"]) if tags.get("raylab.gates.report") else None
    gates = {"status": tags.get("raylab.gates.status", "pending"), "checks": [
        {"gate": c.get("gate"), "passed": c.get("passed"), "value": c.get("value"), "limit": c.get("limit")}
        for c in (report or {}).get("checks", [])]}
    if report:
        gates |= {"evaluated": report.get("evaluated"), "val_loss": report.get("val_loss"),
                  "perplexity": report.get("perplexity")}
    return card | {"evaluation": card["evaluation"] | {"gates": gates}}


# ---------------------------------------------------------------- Markdown


def _num(value: Any, fmt: str = ",") -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, float) and fmt == ",":
        return f"{value:.4g}"
    return format(value, fmt)


def _flops(value: float | None) -> str:
    return UNKNOWN if value is None else f"{float(value):.4g}"


def front_matter(card: dict) -> str:
    """Hugging Face model-card metadata (YAML), through huggingface_hub's own ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    base = card["base_model"]["name"]
    hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and ":" not in base
    method = card["training"]["hyperparameters"]["method"]
    results = [EvalResult(task_type="text-generation", dataset_type="held-out split", dataset_name="data stage val split",
                          dataset_split="val", metric_type=k, metric_name=k, metric_value=v)
               for k, v in card["evaluation"]["metrics"].items() if k.startswith("val_") and isinstance(v, (int, float))]
    data = ModelCardData(
        model_name=f"{card['name']}/{card['version']}", license=card["license"]["id"],
        base_model=base if hub_id else None, library_name="transformers" if method == "full" else "peft",
        pipeline_tag="text-generation", tags=["raylab", method, "fine-tuned"], eval_results=results or None)
    return data.to_yaml()


def render(card: dict) -> str:
    """The Markdown model card (front matter, then one section per topic, then extra_sections)."""
    b, lic, t, comp, eu = card["base_model"], card["license"], card["training"], card["compute"], card["eu_ai_act"]
    lines = ["---", front_matter(card), "---", "", f"# {card['name']} version {card['version']}", ""]
    if card.get("note"):
        lines += [f"> {card['note']}", ""]
    lines += [f"Registered from MLflow run `{card['run_id']}` ({card['stage']} stage), trained {card.get('created') or UNKNOWN}.", "",
              "## Base model and licence", "",
              f"- Base model: `{b['name']}`" + {"pretrained": " (a raylab preset built with random weights, then "
                                                               "pre-trained by this run's pretrain stage)",
                                                 "preset": " (a raylab preset: random weights, no pre-training)"}
              .get(b["built_by_raylab"], ""),
              f"- Parameters: {_num(b['parameters'])} ({b['parameters_source']})",
              f"- Licence: {lic['id']} (source: {lic['source']})", ""]
    for title, key in (("Intended use", "intended_use"), ("Out-of-scope use", "out_of_scope_use")):
        lines += [f"## {title}", "", card[key] or f"Not stated (set governance.card.{key} in the config).", ""]
    if card["authors"] or card["contact"]:
        lines += ["## Authors and contact", "", f"- Authors: {', '.join(card['authors']) or 'not stated'}",
                  f"- Contact: {card['contact'] or 'not stated'}", ""]
    lines += _data_lines(card["data"])
    lines += ["## Training", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in t["hyperparameters"].items()]
    lines += ["", f"- Seed: {t['seed']} (training), {t['data_seed']} (train/val split)",
              f"- Steps: {_num(t['steps'])}, epochs started: {_num(t['epochs_started'])}, stopped early: {t['stopped_early']}",
              f"- Trained tokens: {_num(t['trained_tokens'])}; workers: {t['world_size']}; dtype {t['dtype']}, precision {t['precision']}",
              f"- Config hash {t['config_hash']}, data manifest hash {t['data_manifest_hash']}",
              f"- Code version: {card['code_version']['recorded'] or UNKNOWN} (card written by raylab {card['code_version']['raylab']})", ""]
    lines += _remote_lines(card.get("remote"))
    lines += _eval_lines(card["evaluation"])
    lines += ["## Compute", "",
              f"- Training FLOPs: {_flops(comp['training_flops'])} ({comp['flops_formula'] or 'formula not recorded'})",
              f"- For comparison, {comp['six_n_d_formula']}: {_flops(comp['six_n_d'])}",
              f"- Device-seconds: {_num(comp['device_seconds'])} on {comp['device_type']} "
              f"({comp['workers']} worker(s), {_num(comp['wall_seconds'])} s wall-clock)", "",
              "## EU AI Act: general-purpose model threshold", "",
              f"- Base model's estimated pre-training compute: {_flops(eu['base_pretraining_flops'])} FLOPs ({eu['basis']})",
              f"- One third of it: {_flops(eu['threshold_flops'])} FLOPs; this fine-tune: {_flops(eu['fine_tune_flops'])} FLOPs"
              f" (ratio {_num(eu['ratio'])})", "", eu["statement"], ""]
    for title, markdown in card.get("extra_sections", {}).items():
        lines += [f"## {title}", "", markdown.strip(), ""]
    return "\n".join(lines)


def _data_lines(data: dict | None) -> list[str]:
    if data is None:
        return ["## Training data", "", "Unknown: the data stage's manifest was not found for this version.", ""]
    c = data["counts"]
    lines = ["## Training data", "", f"Data manifest {data['manifest_hash']}, written {data['created']}; "
             f"tokenizer fingerprint {data['tokenizer']}.", "",
             f"- Records read {c['read']:,}, accepted {c['accepted']:,}, rejected {c['rejected']:,}, "
             f"deduplicated {c['deduplicated']:,} ({', '.join(f'{k} {v:,}' for k, v in c['duplicates'].items())}), "
             f"erased {c['erased']:,}", "",
             "| source | type | read | accepted | rejected | duplicates | erased |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['type']} | {s['read']:,} | {s['accepted']:,} | {s['rejected']:,} | {s['duplicates']:,} "
              f"| {s['erased']:,} |" for s in data["sources"]]
    lines += ["", "Source files (sha256):", ""]
    files = [(s["name"], f) for s in data["sources"] for f in s["files"]]
    lines += [f"- {n}: `{f['path']}` {f['sha256']}" for n, f in files] or ["- none (SQL or HTTP sources: no file to hash)"]
    lines += ["", "Rejected by reason: " + (", ".join(f"{k} {v:,}" for k, v in sorted(data["rejected_by_reason"].items())) or "none"),
              "", "Personal data found and redacted, by type: "
              + (", ".join(f"{k} {v:,}" for k, v in sorted(data["pii_found"].items())) or "none found"), "",
              "| split | documents | tokens | target tokens | sequences |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {v['documents']:,} | {v['tokens']:,} | {v['target_tokens']:,} | {v['sequences']:,} |"
              for s, v in data["splits"].items()]
    return [*lines, ""]


def _eval_lines(ev: dict) -> list[str]:
    lines = ["## Evaluation and gates", "", "Measured on the held-out (val) split at the end of training:", ""]
    lines += [f"- {k}: {_num(v)}" for k, v in sorted(ev["metrics"].items())] or ["- none recorded"]
    g = ev["gates"]
    lines += ["", f"Promotion gates: **{g['status']}**" + (f" (evaluated {g['evaluated']}, held-out loss "
                                                           f"{_num(g.get('val_loss'))})" if g.get("evaluated") else
                                                           " (run `raylab models evaluate` to measure them)"), ""]
    if g["checks"]:
        lines += ["| gate | result | value | limit |", "|---|---|---|---|"]
        lines += [f"| {c['gate']} | {'pass' if c['passed'] else 'FAIL'} | {str(c['value'])[:60]} | {str(c['limit'])[:60]} |"
                  for c in g["checks"]]
        lines.append("")
    return lines


# ---------------------------------------------------------------- the registry artifact


def log(store, run_id: str, card: dict) -> None:
    """Write both files as the run's `card/` artifacts (replacing an earlier card)."""
    with tempfile.TemporaryDirectory(prefix="raylab-card-") as tmp:
        write(card, tmp)
        store.client.log_artifacts(run_id, tmp, runs.CARD_DIR)


def write(card: dict, directory: str) -> dict[str, str]:
    """README.md and model_card.json in `directory`; returns their locations."""
    md, js = runs.card_file(directory, "md"), runs.card_file(directory, "json")
    storage.write_text(md, render(card) + "\n")
    storage.write_text(js, json.dumps(card, indent=2, default=str) + "\n")
    return {"md": md, "json": js}


def stored(store, run_id: str) -> dict | None:
    """The card logged with a run, or None when it has none (registered before cards)."""
    from mlflow.artifacts import download_artifacts

    names = {a.path for a in store.client.list_artifacts(run_id, runs.CARD_DIR)}
    wanted = runs.card_file(runs.CARD_DIR, "json")
    if wanted not in names:
        return None
    with tempfile.TemporaryDirectory(prefix="raylab-card-") as tmp:
        path = download_artifacts(run_id=run_id, artifact_path=wanted, dst_path=tmp, tracking_uri=store.uri)
        return json.loads(storage.read_text(path))


def card_for(store, mv) -> dict:
    """A version's card with its current gates: the stored one, else one built now from the
    version's recorded run (config, manifest and train metadata artifacts)."""
    card = stored(store, mv.run_id) or rebuild(store, mv)
    return with_gates(card, dict(mv.tags))


def rebuild(store, mv) -> dict:
    """A card for a version registered before cards existed, from its run's artifacts."""
    from mlflow.artifacts import download_artifacts

    from raylab import config
    from raylab.errors import UserError

    with tempfile.TemporaryDirectory(prefix="raylab-card-") as tmp:
        try:
            cfg = config.load(download_artifacts(run_id=mv.run_id, artifact_path=runs.RESOLVED_CONFIG, dst_path=tmp,
                                                 tracking_uri=store.uri))
            meta = json.loads(storage.read_text(download_artifacts(
                artifact_uri=f"{mv.source}/{runs.TRAIN_META}", dst_path=tmp, tracking_uri=store.uri)))
        except Exception as e:  # noqa: BLE001 - any failure here means the run lacks what a card needs
            raise UserError(f"{mv.name}/{mv.version} has no model card and its run {mv.run_id} lacks the "
                            f"{runs.RESOLVED_CONFIG} or {runs.TRAIN_META} a card is built from ({type(e).__name__}); "
                            "register it again from its run to get one") from None
        names = {a.path for a in store.client.list_artifacts(mv.run_id)}
        manifest = None
        if runs.MANIFEST in names:
            manifest = runs.read_json(download_artifacts(run_id=mv.run_id, artifact_path=runs.MANIFEST, dst_path=tmp,
                                                         tracking_uri=store.uri), runs.DataManifest)
    return build(cfg, meta, manifest, name=mv.name, version=mv.version, run_id=mv.run_id,
                 stage=mv.tags.get("raylab.stage", "train"),
                 note="Built when it was asked for, from the version's recorded run: the version was registered "
                      "before raylab wrote model cards.")


def refresh(store, name: str, version: int) -> None:
    """Re-log a version's card with its current gate results (after `raylab models evaluate`)."""
    mv = store.client.get_model_version(name, str(version))  # now: the tags just written
    card = stored(store, mv.run_id)
    if card is not None:
        log(store, mv.run_id, with_gates(card, dict(mv.tags)))


def at_registration(store, cfg: RaylabConfig, mv, meta: dict, tuned: dict[str, Any] | None) -> None:
    """The card `versions.register` logs for a new version (or one registered without it)."""
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_json(run.manifest, runs.DataManifest) if storage.exists(run.manifest) else None
    card = build(cfg, meta, manifest, name=mv.name, version=mv.version, run_id=mv.run_id,
                 stage=mv.tags.get("raylab.stage", "train"), tuned=tuned)
    log(store, mv.run_id, with_gates(card, dict(mv.tags)))


def at_derivation(store, parent, mv, derivation: str, sections: dict[str, str]) -> None:
    """The card of a version made from `parent` (`raylab optimize`): the parent's facts (its
    base, data, training and compute are this version's too), named for the new version, with
    its own gates and the method's `sections` ({title: markdown}) after the parent's."""
    card = card_for(store, parent) | {"name": mv.name, "version": int(mv.version), "run_id": mv.run_id,
                                      "stage": mv.tags.get("raylab.stage", "optimize"),
                                      "note": f"{derivation} of {parent.name}/{parent.version}: base, data, training "
                                              "and compute below are the parent's."}
    card["extra_sections"] = {**card.get("extra_sections", {}), **sections}
    card.pop("files", None)  # logged under the parent's run, not this one's: `raylab models card --output` cannot copy them
    log(store, mv.run_id, with_gates(card, dict(mv.tags)))


def add_section(store, name: str, version: int, title: str, markdown: str, files: dict[str, str] | None = None) -> dict:
    """Add (or replace) one extra section of a version's card and re-log it; returns the card.
    `files` ({name: location}, e.g. a plot) are logged beside the card under card/, where the
    section links them by name (`![...](name)`), and listed in the card's `files`."""
    mv = store.client.get_model_version(name, str(version))
    card = card_for(store, mv)
    card["extra_sections"] = {**card.get("extra_sections", {}), title: markdown}
    if files:
        with tempfile.TemporaryDirectory(prefix="raylab-card-") as tmp:
            for file_name, location in files.items():
                storage.write_bytes(os.path.join(tmp, file_name), storage.read_bytes(location))
            store.client.log_artifacts(mv.run_id, tmp, runs.CARD_DIR)
        card["files"] = sorted(set(card.get("files", [])) | set(files))
    log(store, mv.run_id, card)
    return card


def download_files(store, mv, card: dict, directory: str) -> list[str]:
    """The files a card's sections link (its `files`, logged by add_section) into `directory`,
    so a card written with `raylab models card --output` keeps its links; returns their locations."""
    from mlflow.artifacts import download_artifacts

    out = []
    with tempfile.TemporaryDirectory(prefix="raylab-card-") as tmp:
        for file_name in card.get("files", []):
            path = download_artifacts(run_id=mv.run_id, artifact_path=f"{runs.CARD_DIR}/{file_name}", dst_path=tmp,
                                      tracking_uri=store.uri)
            # `directory` is the caller's --output, not a run directory: joined as any path
            out.append(storage.write_bytes(os.path.join(directory, file_name), storage.read_bytes(path)))
    return out
