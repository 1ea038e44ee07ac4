"""The global explanation (`eval.global_explanation`, raylab/explain/aggregate.py) on tiny
Llamas built from config (no Ray, CPU): prompt tokens mapped to their parts (system, context,
question, template), and a check with teeth: a model trained briefly to answer with the marked
character of the question puts the question on top of the parts, and the same architecture
trained to answer with the system message's marked character (the control: same prompts,
same marks, another source) puts the system message there and next to nothing on the question."""

from __future__ import annotations

import random

import pytest
import torch

from raylab import models, rag
from raylab.config import ExplainConfig, GlobalExplanationConfig
from raylab.explain import explain_sample, global_markdown, global_plot, prompt_parts

FILL, MARKS = "abcdefgh", "QRSTUVWX"


@pytest.fixture(scope="module")
def tok():
    return models.build_byte_tokenizer()


def _labels_by_text(tok, item, ids, labels) -> dict[str, str]:
    """The text of each part's tokens, joined (what a reader would check by eye)."""
    out: dict[str, str] = {}
    for i, p in zip(ids, labels, strict=True):
        out[p] = out.get(p, "") + tok.decode([i])
    return out


def test_each_prompt_token_is_labelled_with_its_part(tok):
    item = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Office hours?"}]}
    ids = models.prompt_ids(tok, item)
    labels = prompt_parts(tok, item, ids)
    text = _labels_by_text(tok, item, ids, labels)
    assert text["system"] == "Be brief." and text["question"] == "Office hours?"
    assert text["context"] == "Hi thereHello!"  # the earlier turns, both sides
    assert "<|im_start|>" in text["template"] and "Office" not in text["template"]
    # a retrieval prompt (rag's own renderer): the documents are context, the question after them is the question
    rendered = rag.render_prompt("When is it open?", [{"origin": "handbook/hours.md", "text": "Open 9 to 5."}])
    item = {"messages": [{"role": "user", "content": rendered}]}
    ids = models.prompt_ids(tok, item)
    text = _labels_by_text(tok, item, ids, prompt_parts(tok, item, ids))
    assert text["question"] == "When is it open?" and "Open 9 to 5." in text["context"]
    # plain text is all question but its special tokens; ids that are not the rendered prompt: no labels
    ids = models.prompt_ids(tok, {"text": "abc"})
    assert prompt_parts(tok, {"text": "abc"}, ids)[-3:] == ["question"] * 3
    assert prompt_parts(tok, item, ids) is None


def _part(rng: random.Random) -> tuple[str, str]:
    """Three characters, one of them a mark: (content, the mark)."""
    chars = [rng.choice(FILL) for _ in range(3)]
    mark = rng.choice(MARKS)
    chars[rng.randrange(3)] = mark
    return "".join(chars), mark


def _record(rng: random.Random) -> tuple[list[dict], dict[str, str]]:
    """A chat whose system message, earlier turn and question each hold one mark."""
    (system, s), (earlier, c), (question, q) = _part(rng), _part(rng), _part(rng)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": earlier},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": question}]
    return messages, {"system": s, "context": c, "question": q}


def _trained(tok, source: str, steps: int = 120):
    """tiny-llama trained to answer with the mark of `source` (system or question)."""
    torch.manual_seed(0)
    model = models.build_tiny_model("tiny-llama", tok, seed=0)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [_record(rng) for _ in range(32)]
        ids = torch.tensor([models.prompt_ids(tok, {"messages": m}) for m, _ in batch])  # one length: no padding
        target = torch.tensor([tok.convert_tokens_to_ids(marks[source]) for _, marks in batch])
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, -1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.3, (source, float(loss))  # it learned the copy (else the check below would test nothing)
    return model.eval()


def test_the_part_a_model_copies_from_carries_its_answers(tok, tmp_path):
    rng = random.Random(7)
    records = [_record(rng) for _ in range(6)]
    items = [{"id": str(i), "messages": m} for i, (m, _) in enumerate(records)]
    settings = GlobalExplanationConfig(max_target_tokens=1)
    reports = {source: explain_sample(_trained(tok, source), tok, items, settings, ExplainConfig())
               for source in ("question", "system")}
    for source, report in reports.items():
        assert report["explained"] == 6 and not report["skipped"]
        # it answers with the right mark, so what is explained is the behaviour trained
        assert [r["output_text"] for r in report["records"]] == [marks[source] for _, marks in records]
        assert report["top_part"] == source, (source, report["parts"])
    q, s = reports["question"]["parts"], reports["system"]["parts"]
    assert q["question"]["attribution_share"] > 5 * q["system"]["attribution_share"]
    # the control: the same prompts and marks, copied from elsewhere, leave the question next to nothing
    assert s["question"]["attribution_share"] < 0.2 * q["question"]["attribution_share"]
    assert q["question"]["lift"] > 3  # far more than its length would give it
    for report in reports.values():  # shares of one record add up to one, and so do their means
        assert sum(c["attribution_share"] for c in report["parts"].values()) == pytest.approx(1.0)
        assert sum(b["attribution_share"] for b in report["relative"]) == pytest.approx(1.0)
    text = global_markdown(reports["question"])
    assert "the question carries most" in text and "| question |" in text
    png = global_plot(reports["question"], str(tmp_path / "g.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_records_that_cannot_be_explained_are_skipped_and_named(tok):
    model = models.build_tiny_model("tiny-llama", tok, seed=0).eval()
    long = {"id": "long", "messages": [{"role": "user", "content": "x" * 300}]}
    empty = {"id": "empty", "messages": [{"role": "user", "content": "hi"}], "reference": ""}
    report = explain_sample(model, tok, [long, empty], GlobalExplanationConfig(target="reference"), ExplainConfig())
    assert report["explained"] == 0 and report["top_part"] is None
    assert [(s["id"], s["skipped"].split(" ")[0]) for s in report["skipped"]] == [("long", "319"), ("empty", "no")]
    assert global_markdown(report).startswith("No record could be explained (2 skipped: long (319 prompt tokens")
