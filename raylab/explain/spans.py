"""Spans of the prompt as the features of a perturbation method: each span's tokens are put
back to the baseline token together, so the attribution says what a whole sentence (or a
retrieved document) contributed, not one token at a time.

    spans = sentence_spans("Reset it in the portal. Then log in.")    # [(0, 23), (24, 36)]
    found = locate(tok, ids, text, spans, "spans")
    # [{"start", "end", "text", "tokens": [i, ...]}]: the rendered prompt's token positions per span

Offsets are characters of `text`, the prompt as the user wrote it (a completion's text, or a
chat's last user message); `locate` finds that text inside the rendered prompt (chat template
and all) and gives each token to the span it overlaps most. Tokens in no span (the template's
markers, text between spans) are not features: they stay as they are.
"""

from __future__ import annotations

import re

from raylab.errors import UserError

_SENTENCE = re.compile(r"(?=\S)[^\n]*?(?:[.!?]+(?=\s|$)|(?=\n)|$)")


def offsets(tok, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's (start, end) in tok.decode(ids): from the lengths of the decoded prefixes,
    since a byte-level token may be part of a character and decode alone to a replacement mark."""
    ends, end = [], 0
    for k in range(len(ids)):
        end = max(end, len(tok.decode(ids[:k + 1])))
        ends.append(end)
    return list(zip([0, *ends[:-1]], ends, strict=True))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: ending at . ! ? before a space, at a line break, or at the
    end; one without a letter or digit (a lone stop) is none."""
    return [(m.start(), m.start() + len(m.group().rstrip())) for m in _SENTENCE.finditer(text)
            if re.search(r"\w", m.group())]


def check(spans: list, text: str, field: str) -> list[tuple[int, int]]:
    """The spans as (start, end) pairs; exit 2 naming `field` for one outside the text, empty,
    or overlapping another."""
    if not spans:
        raise UserError(f"{field}: no spans; give [start, end] character offsets into the prompt text")
    out = []
    for i, span in enumerate(spans):
        if not isinstance(span, list | tuple) or len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
            raise UserError(f"{field}[{i}]: {span!r} is not a pair of character offsets [start, end]")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise UserError(f"{field}[{i}]: [{start}, {end}] is not a non-empty range inside the prompt text "
                            f"(0 to {len(text)} characters)")
        out.append((start, end))
    ordered = sorted(out)
    for (s1, e1), (s2, _) in zip(ordered, ordered[1:], strict=False):
        if s2 < e1:
            raise UserError(f"{field}: [{s1}, {e1}] and a span starting at {s2} overlap; spans must not")
    return out


def locate(tok, ids: list[int], text: str, spans: list[tuple[int, int]], field: str) -> list[dict]:
    """Each span with the positions of its tokens in the rendered `ids`; exit 2 naming `field`
    when the text is not in the rendered prompt or a span holds no token of its own."""
    rendered = tok.decode(ids)
    base = rendered.rfind(text)  # the last: a chat's last user message comes after the others
    if base < 0:
        raise UserError(f"{field}: the prompt text is not found verbatim in the rendered prompt (the chat template "
                        "changed it), so character offsets cannot be mapped to tokens")
    owner: dict[int, list[int]] = {j: [] for j in range(len(spans))}
    for i, (a, b) in enumerate(offsets(tok, ids)):
        overlaps = [(min(b, base + e) - max(a, base + s), j) for j, (s, e) in enumerate(spans)]
        best, j = max(overlaps)
        if best > 0:
            owner[j].append(i)
    found = []
    for j, (s, e) in enumerate(spans):
        if not owner[j]:
            raise UserError(f"{field}[{j}]: [{s}, {e}] holds no token of its own (the tokens there belong to a "
                            "neighbouring span); widen it or merge it with its neighbour")
        found.append({"start": s, "end": e, "text": text[s:e], "tokens": owner[j]})
    return found


def features(tok, ids: list[int], text: str, spans: list | None, granularity: str, field: str) -> list[dict] | None:
    """The spans a request asks for, located (None: token features). `spans` wins over
    `granularity: sentence`; `field` names where bad offsets came from."""
    if spans is None and granularity == "token":
        return None
    if spans is not None and granularity != "token":
        raise UserError(f"{field}: give spans or granularity {granularity}, not both")
    chosen = check(spans, text, field) if spans is not None else sentence_spans(text)
    if not chosen:
        raise UserError(f"{field}: the prompt text holds no sentence to attribute to")
    return locate(tok, ids, text, chosen, field)
