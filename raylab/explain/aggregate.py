"""The global explanation `raylab eval` writes (`eval.global_explanation`): token attributions of
a model's answers over a sample of held-out prompts, aggregated into which prompt parts
(system, context, question, chat template; parts.py) and which positions carry the answers.

    raylab eval configs/quickstart.yaml eval.global_explanation={}      # eval/global_explanation.{json,png}
    report = run_global(cfg, model_dir, items)      # items: {messages | prompt | text, reference?, id}
    storage.write_text("g.json", json.dumps(report)); plot(report, "g.png"); print(markdown(report))

Each record is explained as `raylab explain` explains one prompt (`explain_ids`: the same
methods, baseline and limits of the `explain:` section), its answer cut at
`eval.global_explanation.max_target_tokens`. Per record, a prompt token's weight is the sum of
the absolute attributions of every answer token to it, divided by the record's total: each
record counts once, however long, and the shares of its tokens add up to one. The report
averages those shares over the records by part and by position (tenths of the prompt, and
distance from its end), beside the share of tokens each holds: a part that carries more of the
answer than its length would give it has a `lift` above one. Signed shares keep the direction
(negative: the part lowered the answer's log-probability).

An attribution is what one method says about one model; a sample of 16 records is a sketch of
where the answers come from, not a measurement of them.
"""

from __future__ import annotations

import logging
import time

from raylab import models
from raylab.config import ExplainConfig, GlobalExplanationConfig, RaylabConfig
from raylab.core import storage
from raylab.explain import parts, stage

log = logging.getLogger(__name__)

BINS = 10
FROM_END = ((0, 0, "last token"), (1, 3, "2-4 from the end"), (4, 15, "5-16"), (16, 63, "17-64"),
            (64, None, "65 and earlier"))
UNIT = ("share of the answer's absolute attribution (per record: |attribution| summed over answer tokens, "
        "divided by the record's total; averaged over records)")


def target_ids(model, tok, item: dict, ids: list[int], g: GlobalExplanationConfig) -> list[int]:
    """The answer explained: the model's greedy answer, or the item's reference teacher-forced."""
    if g.target == "reference":
        return tok(item.get("reference") or "", add_special_tokens=False)["input_ids"][:g.max_target_tokens]
    return models.greedy_ids(model, tok, [ids], g.max_target_tokens)[0]


def explain_item(model, tok, item: dict, g: GlobalExplanationConfig, ex: ExplainConfig) -> dict:
    """One record's attributions (stage.explain_ids's result) with `parts`, or {id, skipped: reason}."""
    ids = models.prompt_ids(tok, item)
    rid = str(item.get("id", ""))
    if len(ids) > ex.max_prompt_tokens:
        return {"id": rid, "skipped": f"{len(ids)} prompt tokens, over explain.max_prompt_tokens {ex.max_prompt_tokens}"}
    target = target_ids(model, tok, item, ids, g)
    if not target:
        return {"id": rid, "skipped": "empty answer" if g.target == "greedy" else "no reference"}
    labels = parts.label(tok, item, ids)
    if labels is None:
        return {"id": rid, "skipped": "its tokens could not be mapped back to the prompt's parts"}
    result = stage.explain_ids(model, tok, ids, target, g.method, n_steps=g.n_steps, samples=ex.samples,
                               baseline=ex.baseline)
    return result | {"id": rid, "parts": labels, "output_text": tok.decode(target, skip_special_tokens=True)}


def token_weights(result: dict) -> list[float]:
    """Each prompt token's share of the record's absolute attribution (they sum to one; all
    zero when the answer does not depend on the prompt at all)."""
    n = len(result["input_tokens"])
    magnitude = [sum(abs(row[i]) for row in result["attributions"]) for i in range(n)]
    total = sum(magnitude)
    return [m / total for m in magnitude] if total > 0 else [0.0] * n


def _from_end(distance: int) -> str:
    return next(name for low, high, name in FROM_END if distance >= low and (high is None or distance <= high))


def record_summary(result: dict) -> dict:
    """One record's shares by part and position, and its top tokens."""
    w = token_weights(result)
    n = len(w)
    total = sum(abs(t) for t in result["input_totals"]) or 1.0
    by_part = {p: {"attribution_share": 0.0, "token_share": 0.0, "signed_share": 0.0} for p in parts.PARTS}
    rel = [{"attribution_share": 0.0, "token_share": 0.0} for _ in range(BINS)]
    end = {name: {"attribution_share": 0.0, "token_share": 0.0} for _, _, name in FROM_END}
    for i, (weight, part) in enumerate(zip(w, result["parts"], strict=True)):
        for cell in (by_part[part], rel[i * BINS // n], end[_from_end(n - 1 - i)]):
            cell["attribution_share"] += weight
            cell["token_share"] += 1 / n
        by_part[part]["signed_share"] += result["input_totals"][i] / total
    top = sorted(range(n), key=lambda i: -w[i])[:5]
    return {"id": result["id"], "input_tokens": n, "output_tokens": len(result["output_tokens"]),
            "output_text": result["output_text"], "parts": by_part, "relative": rel, "from_end": end,
            "top_tokens": [{"token": result["input_tokens"][i], "position": i, "part": result["parts"][i],
                            "share": w[i]} for i in top],
            **({"max_abs_delta": max(map(abs, result["convergence_deltas"]))} if "convergence_deltas" in result else {})}


def _mean(cells: list[dict]) -> dict:
    keys = cells[0].keys()
    return {k: sum(c[k] for c in cells) / len(cells) for k in keys}


def aggregate(records: list[dict]) -> dict:
    """The global view of explained records (record_summary's): mean shares by part and by
    position, each part's lift (attribution share / token share) and which of system, context and
    question carries most (`top_part`)."""
    if not records:
        return {"parts": {}, "relative": [], "from_end": {}, "top_part": None}
    by_part = {}
    for p in parts.PARTS:
        cell = _mean([r["parts"][p] for r in records])
        cell["lift"] = cell["attribution_share"] / cell["token_share"] if cell["token_share"] else None
        cell["records"] = sum(r["parts"][p]["token_share"] > 0 for r in records)
        by_part[p] = cell
    relative = [{"bin": f"{10 * b}-{10 * (b + 1)}%"} | _mean([r["relative"][b] for r in records]) for b in range(BINS)]
    from_end = {name: _mean([r["from_end"][name] for r in records]) for _, _, name in FROM_END}
    # the part of what was asked (not the template's fixed scaffolding, which every answer leans on)
    asked = [p for p in parts.CONTENT if by_part[p]["records"]]
    top = max(asked, key=lambda p: by_part[p]["attribution_share"]) if asked else None
    return {"parts": by_part, "relative": relative, "from_end": from_end, "top_part": top}


def explain_sample(model, tok, items: list[dict], g: GlobalExplanationConfig, ex: ExplainConfig) -> dict:
    """The global explanation of a loaded model over `items` (the first g.samples of them)."""
    started = time.perf_counter()
    chosen = items[:g.samples]
    explained, skipped = [], []
    for item in chosen:
        out = explain_item(model, tok, item, g, ex)
        if "skipped" in out:
            skipped.append(out)
        else:
            explained.append(record_summary(out))
    params = {"baseline": f"{ex.baseline} token", "max_target_tokens": g.max_target_tokens}
    params |= {"n_steps": g.n_steps} if g.method == "integrated_gradients" else {}
    params |= {"samples": ex.samples} if g.method == "shapley_sampling" else {}
    report = {"method": g.method, "parameters": params, "target": "greedy answer" if g.target == "greedy" else
              "reference answer, teacher-forced", "unit": UNIT, "requested": len(chosen), "explained": len(explained),
              "skipped": skipped, **aggregate(explained), "records": explained,
              "seconds": round(time.perf_counter() - started, 2)}
    log.info(f"explain: global explanation of {len(explained)} record(s) ({len(skipped)} skipped) by {g.method} "
             f"in {report['seconds']:.1f} s; the {report['top_part']} carries most")
    return report


def run_global(cfg: RaylabConfig, path: str, items: list[dict], base: bool = False) -> dict:
    """`eval.global_explanation` for the model in directory `path` (a final/ or a fetched
    version; `base`: what it was trained from), loaded in this process in float32 for the
    gradients, on `eval.cpus_per_actor` torch threads."""
    import torch

    from raylab.explain import attribute

    attribute.captum_attr()  # a missing extra fails before the model loads
    torch.set_num_threads(max(1, int(cfg.eval.cpus_per_actor)))
    inf = models.load(path, tokenizer_path=path, base=base, dtype="float32")
    return explain_sample(inf.model, inf.tokenizer, items, cfg.eval.global_explanation, cfg.explain)


def explain_answer(cfg: RaylabConfig, ref: str, item: dict, store=None) -> dict:
    """One prompt's answer by REF explained as the global explanation explains each record
    (`eval.global_explanation`'s method, else feature ablation: one forward pass per prompt
    token), the answer up to explain.max_target_tokens: what `raylab run`'s summary prints.
    Returns record_summary's fields (top tokens, shares by part) with method and seconds, or
    {id, skipped: reason}. `store`: the registry REF is in (default: the usual lookup)."""
    import torch

    from raylab.explain import attribute

    attribute.captum_attr()
    g = (cfg.eval.global_explanation or GlobalExplanationConfig()).model_copy(
        update={"max_target_tokens": cfg.explain.max_target_tokens})
    torch.set_num_threads(max(1, int(cfg.eval.cpus_per_actor)))
    inf = models.load(ref, dtype="float32", store=store)
    started = time.perf_counter()
    out = explain_item(inf.model, inf.tokenizer, item, g, cfg.explain)
    if "skipped" in out:
        return out
    return record_summary(out) | {"model": inf.ref or ref, "method": g.method,
                                  "seconds": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------- the plot and the card


def plot(report: dict, location: str, title: str = "") -> str:
    """Two panels: attribution vs token share by prompt part, and by tenth of the prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["parts"])
    for offset, key, label in ((-0.2, "attribution_share", "share of attribution"), (0.2, "token_share", "share of tokens")):
        left.bar([i + offset for i in range(len(names))], [report["parts"][p][key] for p in names], 0.4, label=label)
        right.plot(range(len(report["relative"])), [b[key] for b in report["relative"]], marker="o", label=label)
    left.set_xticks(range(len(names)), names)
    left.set_title("by prompt part")
    left.legend(fontsize=8)
    right.set_xticks(range(len(report["relative"])), [b["bin"] for b in report["relative"]], rotation=45, fontsize=7)
    right.set_title("by position in the prompt (start to end)")
    right.legend(fontsize=8)
    fig.suptitle(title or f"Where the answers come from: {report['method']}, {report['explained']} records")
    fig.tight_layout()
    storage.save_figure(fig, location, dpi=100)
    plt.close(fig)
    return location


def markdown(report: dict) -> str:
    """The global explanation as Markdown: the parts table, the positions from the end, what was skipped."""
    if not report["explained"]:
        return f"No record could be explained ({len(report['skipped'])} skipped: {_skips(report)})."
    params = ", ".join(f"{k} {v}" for k, v in report["parameters"].items())
    lines = [f"{report['method']} ({params}) over {report['explained']} held-out record(s), explaining the "
             f"{report['target']}; of system, context and question, the {report['top_part']} carries most. Share: {report['unit']}. Lift: share of "
             "attribution / share of tokens (above 1: more than its length gives it).", "",
             "| prompt part | share of attribution | share of tokens | lift | signed share | records with it |",
             "|---|---|---|---|---|---|"]
    for p, c in report["parts"].items():
        lift = "" if c["lift"] is None else f"{c['lift']:.2f}"
        lines.append(f"| {p} | {c['attribution_share']:.3f} | {c['token_share']:.3f} | {lift} | "
                     f"{c['signed_share']:+.3f} | {c['records']} |")
    lines += ["", "| position | share of attribution | share of tokens |", "|---|---|---|"]
    lines += [f"| {name} | {c['attribution_share']:.3f} | {c['token_share']:.3f} |" for name, c in report["from_end"].items()]
    if report["skipped"]:
        lines += ["", f"Skipped {len(report['skipped'])}: {_skips(report)}"]
    return "\n".join(lines)


def _skips(report: dict) -> str:
    return "; ".join(f"{s['id']} ({s['skipped']})" for s in report["skipped"][:5])
