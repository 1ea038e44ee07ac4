"""What `raylab explain` prints and writes: a top-k summary per output token, and one
self-contained HTML file with the tokens coloured by attribution (all text escaped).

    print(summary(result, k=3))
    storage.write_text("why.html", html(result))    # the stage writes it through core.storage
"""

from __future__ import annotations

import html as _html


def _show(token: str) -> str:
    return repr(token)[1:-1] or "''"  # newlines and spaces visible in a one-line summary


def inputs(result: dict) -> list[str]:
    """What the attribution columns are: the prompt's tokens, or its spans' texts."""
    found = result.get("input_spans")
    return [span["text"] for span in found] if found else result["input_tokens"]


def summary(result: dict, k: int = 3) -> str:
    """One line per output token: its top-k input tokens by attribution (and IG's delta)."""
    deltas = result.get("convergence_deltas")
    params = ", ".join(f"{key}={value}" for key, value in result["parameters"].items())
    names = inputs(result)
    lines = [f"{result.get('model', 'model')}: {result['method']} ({params}), {len(names)} input x "
             f"{len(result['output_tokens'])} output tokens, {result['seconds']:.2f} s",
             f"target ({result.get('target_source', 'given')}): {result.get('output_text', ''.join(result['output_tokens']))!r}"]
    for t, (token, row) in enumerate(zip(result["output_tokens"], result["attributions"], strict=True)):
        top = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        cells = ", ".join(f"{_show(names[i])}@{i} {row[i]:+.3f}" for i in top)
        lines.append(f"  {t:>3} {_show(token):<10} <- {cells}" + (f"  (delta {deltas[t]:+.2e})" if deltas else ""))
    totals = result["input_totals"]
    top = sorted(range(len(totals)), key=lambda i: -totals[i])[:k]
    lines.append("  all outputs <- " + ", ".join(f"{_show(names[i])}@{i} {totals[i]:+.3f}" for i in top))
    return "\n".join(lines)


def _colour(value: float, scale: float) -> str:
    # red for positive (raised the log-probability), blue for negative, alpha by magnitude
    alpha = min(abs(value) / scale, 1.0) if scale else 0.0
    rgb = "220,40,40" if value >= 0 else "40,90,220"
    return f"rgba({rgb},{alpha:.3f})"


def _tokens(tokens: list[str], values: list[float]) -> str:
    scale = max((abs(v) for v in values), default=0.0)
    return "".join(f'<span class="t" style="background:{_colour(v, scale)}" title="{_html.escape(t)} {v:+.4f}">'
                   f"{_html.escape(t)}</span>" for t, v in zip(tokens, values, strict=True))


def html(result: dict) -> str:
    """One HTML page: the prompt coloured by its total attribution, then one row per output token."""
    esc = _html.escape
    params = ", ".join(f"{key}={value}" for key, value in result["parameters"].items())
    deltas = result.get("convergence_deltas")
    rows = []
    for t, (token, row) in enumerate(zip(result["output_tokens"], result["attributions"], strict=True)):
        delta = f"<td>{deltas[t]:+.2e}</td>" if deltas else ""
        rows.append(f"<tr><td>{t}</td><td><code>{esc(token)}</code></td>{delta}"
                    f"<td>{_tokens(inputs(result), row)}</td></tr>")
    delta_head = "<th>delta</th>" if deltas else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>raylab explain: {esc(str(result.get('model', '')))}</title>
<style>body{{font-family:sans-serif;margin:2em}} .t{{white-space:pre-wrap;font-family:monospace;padding:1px 0}}
td{{vertical-align:top;padding:2px 8px}} table{{border-collapse:collapse}} tr:nth-child(even){{background:#f6f6f6}}</style>
</head><body>
<h1>{esc(str(result.get('model', '')))}: {esc(result['method'])}</h1>
<p>{esc(params)}; {result['seconds']:.2f} s. Red raised the output token's {"log odds" if result["method"] == "shap" else "log-probability"},
blue lowered it;
the stronger the colour, the larger the share (scaled per row). Hover a token for its value.</p>
<h2>Answer ({esc(str(result.get('target_source', 'given')))})</h2><p><code>{esc(result.get('output_text', ''))}</code></p>
<h2>Prompt{" spans" if result.get("input_spans") else ""}, by total attribution over the answer</h2>
<p>{_tokens(inputs(result), result['input_totals'])}</p>
<h2>Per output token</h2>
<table><tr><th>#</th><th>token</th>{delta_head}<th>prompt</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
