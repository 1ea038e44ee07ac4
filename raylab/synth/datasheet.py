"""The synth run's datasheet: what was asked, what came back, what each filter dropped (with
examples, already redacted) and what was kept, as JSON (the facts) and Markdown (for people).

    raylab synth CONFIG      # writes runs/<name>/synth/datasheet.{json,md}
"""

from __future__ import annotations

import json


def build(cfg, generators: list, filters, client, outputs: dict[str, str]) -> dict:
    s = cfg.synth
    return {
        "endpoint": {"model": s.endpoint.model, "remote_allowed": cfg.governance.allow_remote},
        "requests": {"sent": client.sent, "cached": client.cached, "budget": s.max_requests},
        "filters": {"novelty_rouge_l_below": s.filters.novelty, "min_chars": s.filters.min_chars,
                    "max_chars": s.filters.max_chars, "decontaminate_ngram": s.filters.decontaminate_ngram,
                    "evaluation_grams": len(filters.contamination), "pii_redactions": dict(sorted(filters.pii.items())),
                    "texts_redacted": filters.redacted_texts},
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
             f"novelty below {f['novelty_rouge_l_below']}.", ""]
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
        lines.append(f"- novelty: {g['novelty']['compared']:,} exact ROUGE-L comparisons on MinHash candidates; "
                     f"candidate recall on a sample of {recall['sample']}: "
                     + (f"{recall['recall']:.1%} of {recall['similar_pairs']} similar pair(s)"
                        if recall["recall"] is not None else "no similar pair in the sample"))
        shown = _examples(g["failed"]) + _examples(g["rejected"]) + _examples(g["dropped"])
        if "instructions" in g:
            shown += _examples(g["instructions"]["dropped"])
        if shown:
            lines += ["", "What was dropped (examples):", *shown]
        lines.append("")
    return "\n".join(lines)
