"""The synth run's datasheet: what was asked, what came back, what each filter dropped (with
examples, already redacted) and what was kept, as JSON (the facts) and Markdown (for people).

    raylab synth CONFIG      # writes runs/<name>/synth/datasheet.{json,md}
"""

from __future__ import annotations

import json


def build(cfg, generators: list, filters, client, outputs: dict[str, str]) -> dict:
    s = cfg.synth
    return {
        "endpoint": {"model": client.ep.model, "remote_allowed": cfg.governance.allow_remote,
                     "raylab_served": s.endpoint is None},
        "requests": {"sent": client.sent, "cached": client.cached, "budget": s.max_requests},
        "filters": {"novelty_rouge_l_below": s.filters.novelty, "min_chars": s.filters.min_chars,
                    "max_chars": s.filters.max_chars, "decontaminate_ngram": s.filters.decontaminate_ngram,
                    "evaluation_grams": len(filters.contamination), "pii_redactions": dict(sorted(filters.pii.items())),
                    "texts_redacted": filters.redacted_texts,
                    "judge_min_score": s.filters.judge.min_score if s.filters.judge is not None else None},
        "generators": {g.name: g.facts() for g in generators},
        "outputs": outputs,
    }


def _counts(tally: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in tally["counts"].items()) or "none"


def _examples(tally: dict) -> list[str]:
    lines = []
    for reason, examples in tally["examples"].items():
        for e in examples:
            lines.append(f"  - {reason}: `{json.dumps(e, ensure_ascii=False)[:400]}`")
    return lines


def render(facts: dict) -> str:
    f, r = facts["filters"], facts["requests"]
    lines = ["# Synthetic data datasheet", "",
             f"Endpoint model `{facts['endpoint']['model']}`; {r['sent']:,} request(s) sent, {r['cached']:,} answered "
             f"from the cache (budget {r['budget']:,}).", "",
             f"Filters: PII redacted first ({', '.join(f'{k} {v}' for k, v in f['pii_redactions'].items()) or 'none found'}"
             f" in {f['texts_redacted']} text(s)); length {f['min_chars']}..{f['max_chars']} characters; refusals; "
             f"{f['decontaminate_ngram']}-gram overlap with {f['evaluation_grams']:,} evaluation n-gram(s); ROUGE-L "
             f"novelty below {f['novelty_rouge_l_below']}"
             + (f"; the endpoint's grade at least {f['judge_min_score']} of 5." if f.get("judge_min_score") else ".")
             , ""]
    for name, g in facts["generators"].items():
        q = g["requests"]
        recall = g["novelty"]["candidate_recall"]
        lines += [f"## {name}", "",
                  f"- kept: **{g['kept']:,}** examples -> `{facts['outputs'][name]}`",
                  f"- requests: {q['asked']:,} asked, {q['cached']:,} cached, {q['sent']:,} sent, {q['ok']:,} answered",
                  f"- failed requests: {_counts(g['failed'])}",
                  f"- answers rejected by the strict parser: {_counts(g['rejected'])}",
                  f"- examples dropped: {_counts(g['dropped'])}"]
        if "instructions" in g:
            lines.append(f"- instructions kept: {g['instructions']['kept']:,}; dropped: "
                         f"{_counts(g['instructions']['dropped'])}")
        if "evolutions" in g:
            e = g["evolutions"]
            lines.append(f"- evolutions over {e['rounds']} round(s): "
                         + (", ".join(f"{k} {v:,}" for k, v in e["evolved"].items()) or "none")
                         + f"; eliminated: {_counts(e['eliminated'])}")
        if "judge" in g:
            lines.append(f"- judge grades (kept at {g['judge']['min_score']} or above): "
                         + (", ".join(f"{k}: {v:,}" for k, v in g["judge"]["scores"].items()) or "none"))
        lines.append(f"- novelty: {g['novelty']['compared']:,} exact ROUGE-L comparisons on MinHash candidates; "
                     f"candidate recall on a sample of {recall['sample']}: "
                     + (f"{recall['recall']:.1%} of {recall['similar_pairs']} similar pair(s)"
                        if recall["recall"] is not None else "no similar pair in the sample"))
        shown = _examples(g["failed"]) + _examples(g["rejected"]) + _examples(g["dropped"])
        if "instructions" in g:
            shown += _examples(g["instructions"]["dropped"])
        if "evolutions" in g:
            shown += _examples(g["evolutions"]["eliminated"])
        if shown:
            lines += ["", "What was dropped (examples):", *shown]
        lines.append("")
    return "\n".join(lines)
