"""Spans as features (raylab/explain/spans.py): sentences found in a prompt, character offsets
mapped to the tokens of the rendered prompt (chat template and all), and every bad span
refused with the field named."""

from __future__ import annotations

import pytest

from raylab import models
from raylab.errors import UserError
from raylab.explain import span_features
from raylab.explain.spans import sentence_spans

TEXT = "Reset it in the portal. Then log in!\nDone"


def test_sentences_end_at_stops_and_line_breaks():
    assert [TEXT[a:b] for a, b in sentence_spans(TEXT)] == ["Reset it in the portal.", "Then log in!", "Done"]
    other = "v1.2 is out. ok"
    assert [other[a:b] for a, b in sentence_spans(other)] == ["v1.2 is out.", "ok"]  # no stop inside a word


@pytest.mark.parametrize("item", [{"prompt": TEXT}, {"text": TEXT},
                                  {"messages": [{"role": "user", "content": "earlier"}, {"role": "assistant",
                                                "content": "yes"}, {"role": "user", "content": TEXT}]}])
def test_spans_map_to_the_tokens_of_the_rendered_prompt(item):
    tok = models.build_byte_tokenizer()
    ids = models.prompt_ids(tok, item)
    found = span_features(tok, ids, TEXT, None, "sentence", "spans")
    assert [tok.decode([ids[i] for i in f["tokens"]]) for f in found] == [f["text"] for f in found]
    assert [f["text"] for f in found] == ["Reset it in the portal.", "Then log in!", "Done"]
    given = span_features(tok, ids, TEXT, [[6, 8], [0, 5]], "token", "spans")  # any order
    assert [tok.decode([ids[i] for i in f["tokens"]]) for f in given] == ["it", "Reset"]
    assert span_features(tok, ids, TEXT, None, "token", "spans") is None  # tokens: no spans


def test_bad_spans_name_the_field():
    tok = models.build_byte_tokenizer()
    ids = models.prompt_ids(tok, {"text": TEXT})

    def refused(spans, granularity="token", text=TEXT) -> str:
        with pytest.raises(UserError) as e:
            span_features(tok, ids, text, spans, granularity, "spans")
        return str(e.value)

    assert "spans[1]: [30, 99] is not a non-empty range" in refused([[0, 5], [30, 99]])
    assert "spans[0]: [3, 3]" in refused([[3, 3]])
    assert "overlap" in refused([[0, 10], [5, 12]])
    assert "spans[0]: [1, 'x'] is not a pair" in refused([[1, "x"]])
    assert "no spans" in refused([])
    assert "not both" in refused([[0, 5]], "sentence")
    assert "not found verbatim" in refused([[0, 3]], text="absent text")

