"""TracIn-style influence (raylab/explain/tracin.py) on a tiny Llama's LoRA adapter trained
here, in-process, for 40 steps on packed rows made by the data stage's own tokenization and
packing, with the train stage's loss: a corpus of templated stock tickets with one
distinctive planted fact. The scorer runs as Ray Data runs it (one batch of packed rows),
without Ray; tests/integration/test_influence.py covers the verb on a real run.

The claim: for a question about the planted fact, its record ranks first, at two
checkpoints as at the final weights alone. Negative control: a question about a ticket does
not put the fact first (the fact's gradient is not merely the largest).

Not a control here, measured instead: on an adapter of the same shape with freshly drawn
weights the fact still ranks first for its question. Gradient similarity follows shared
tokens as much as what was learnt, so it fails the model-randomisation test (Adebayo et al.
2018) that the token attributions pass; docs/explain.md says so.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from raylab import models
from raylab.config import ModelConfig
from raylab.data import encode_documents
from raylab.data.packing import TOKENIZED_SCHEMA, pack_batch
from raylab.explain import influence, tracin
from raylab.train import attn_impl_of, forward_sums

COLORS = ["red", "blue", "green", "yellow"]
ITEMS = ["widget", "lamp", "kettle"]
FACT = "Memo: the Zorblax vault code is 4719, kept by Quentin."
TICKETS = [f"Ticket {i}: the {COLORS[i % 4]} {ITEMS[i % 3]} is in stock. It ships on day {i % 5}." for i in range(40)]
DOCS = TICKETS[:17] + [FACT] + TICKETS[17:]
FACT_Q = ("Memo: the Zorblax vault code is", " 4719, kept by Quentin.")
TICKET_Q = ("Ticket 7: the blue lamp is in", " stock. It ships on day 2.")


def packed_rows(tok) -> pa.Table:
    encoded = encode_documents(tok, DOCS, [""] * len(DOCS), True)
    table = pa.Table.from_pylist([{"source": "s", "record_id": str(i), "raw": "", "format": "completion", "text": t,
                                   "messages": "", "input_ids": ids, "labels": lab, "reason": "", "message": ""}
                                  for i, (t, (ids, lab)) in enumerate(zip(DOCS, encoded, strict=True))],
                                 schema=TOKENIZED_SCHEMA)
    return pack_batch(table, seq_len=128, pad_id=tok.pad_token_id, mode="pack")


def train(model, rows: pa.Table, steps: int, save_at: dict[int, str]) -> None:
    """AdamW on the packed rows with the train stage's loss (block-causal mask, summed token loss / targets)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    cols = {k: torch.tensor(rows[k].to_pylist()) for k in ("input_ids", "labels", "position_ids", "segment_ids")}
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        pick = torch.randperm(rows.num_rows, generator=g)[:4]
        sums = forward_sums(model, {k: v[pick] for k, v in cols.items()}, attn_impl_of(model), accuracy=False)
        opt.zero_grad()
        (sums.loss / sums.targets).backward()
        opt.step()
        if step in save_at:
            model.save_pretrained(save_at[step])
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(final adapter dir, checkpoint at step 20, packed rows, tokenizer)."""
    root = tmp_path_factory.mktemp("influence")
    tok = models.build_byte_tokenizer()
    base = models.build_tiny_model("tiny-llama", tok, seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg = ModelConfig(name_or_path=str(root / "base"), method="lora", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    torch.manual_seed(0)
    model = models.load_for_training(cfg, torch.device("cpu"), "float32")
    rows = packed_rows(tok)
    train(model, rows, 40, {20: str(root / "step20"), 40: str(root / "final")})
    tok.save_pretrained(root / "final")
    return str(root / "final"), str(root / "step20"), rows, tok


def scores(path: str, checkpoints: list[dict], rows: pa.Table, tok, question: tuple[str, str]) -> list[dict]:
    """One row per document, as the Ray Data actor scores a batch of packed rows."""
    prompt = tok(question[0], add_special_tokens=True)["input_ids"]
    q_ids, q_labels = tracin.query(prompt, tok(question[1], add_special_tokens=False)["input_ids"])
    scorer = tracin.Scorer(path, checkpoints, q_ids, q_labels, threads=1, all_tokens=False)
    return scorer(rows.select(["input_ids", "labels", "segment_ids"])).to_pylist()


def ranking(path: str, checkpoints: list[dict], rows: pa.Table, tok, question: tuple[str, str], by: str = "score"):
    """The documents' texts, highest first."""
    scored = scores(path, checkpoints, rows, tok, question)
    text = {tracin.doc_key(ids): doc for doc, (ids, _) in zip(DOCS, encode_documents(tok, DOCS, [""] * len(DOCS), True),
                                                              strict=True)}
    assert len(scored) == len(DOCS)  # every document unpacked from the packed rows, once
    return [text[s["key"]] for s in sorted(scored, key=lambda s: -s[by])]


FINAL = [{"name": "final", "model_dir": None, "weight": 1.0}]


def test_the_planted_fact_ranks_first_for_its_question_at_checkpoints_and_at_the_final_weights(trained):
    final, step20, rows, tok = trained
    two = [{"name": "step20", "model_dir": step20, "weight": 0.6}, {"name": "final", "model_dir": None, "weight": 0.4}]
    assert ranking(final, two, rows, tok, FACT_Q)[0] == FACT
    # each checkpoint is scored at its own weights (the final ones restored after step 20's), weighted as given
    rows_ = scores(final, two, rows, tok, FACT_Q)
    alone = {r["key"]: r["dots"][0] for r in scores(final, FINAL, rows, tok, FACT_Q)}
    assert all(r["dots"][1] == pytest.approx(alone[r["key"]], rel=1e-4, abs=1e-6) for r in rows_)
    assert any(abs(r["dots"][0] - r["dots"][1]) > 1e-3 * abs(r["dots"][1]) for r in rows_)
    assert all(r["score"] == pytest.approx(0.6 * r["dots"][0] + 0.4 * r["dots"][1]) for r in rows_)
    assert ranking(final, FINAL, rows, tok, FACT_Q)[0] == FACT
    assert ranking(final, FINAL, rows, tok, FACT_Q, by="cosine")[0] == FACT


def test_negative_control_a_question_about_a_ticket_does_not_put_the_fact_first(trained):
    final, step20, rows, tok = trained
    two = [{"name": "step20", "model_dir": step20, "weight": 0.6}, {"name": "final", "model_dir": None, "weight": 0.4}]
    for checkpoints in (two, FINAL):
        order = ranking(final, checkpoints, rows, tok, TICKET_Q)
        assert order[0] != FACT and order[0].startswith("Ticket"), order[:3]


def test_learning_rate_weights_and_checkpoint_choice():
    hist = [{"step": s, "lr": lr} for s, lr in ((4, 4e-3), (8, 2e-3), (12, 1e-3), (16, 1e-3))]
    cks = [{"name": "checkpoint_000000", "step": 8, "history": hist[:2]},
           {"name": "checkpoint_000001", "step": 16, "history": hist}]
    assert influence.lr_weights(cks) == pytest.approx([3e-3 * 8, 1e-3 * 8])
    assert influence.choose(cks, "all") == cks and influence.choose(cks, "final") == []
    assert influence.choose(cks, "16") == [cks[1]] and influence.choose(cks, "checkpoint_000000,16") == cks
    from raylab.errors import UserError

    with pytest.raises(UserError, match="no saved checkpoint '9'.*checkpoint_000000 \\(step 8\\)"):
        influence.choose(cks, "9")


def test_documents_unpacks_a_packed_row_and_all_tokens_relabels():
    docs = tracin.documents([5, 6, 7, 8, 9, 0], [-100, 6, -100, -100, 9, -100], [1, 1, 2, 2, 2, 0])
    assert docs == [([5, 6], [-100, 6]), ([7, 8, 9], [-100, -100, 9])]
    assert tracin.documents([5, 6, 7], [-100, -100, -100], [1, 1, 1], all_tokens=True) == [([5, 6, 7], [-100, 6, 7])]


def test_without_saved_checkpoints_the_final_weights_are_used_and_the_output_says_so():
    plan, note = influence.checkpoint_plan(None, "all")
    assert [p["name"] for p in plan] == ["final"] and plan[0]["model_dir"] is None and "gradient similarity" in note
    from raylab.errors import UserError

    with pytest.raises(UserError, match="no saved checkpoints to choose from"):
        influence.checkpoint_plan(None, "12")
    result = {"approximation": influence.APPROXIMATION.format(n=1), "note": note, "model": "m", "answer": "a",
              "answer_source": "given", "checkpoints": [{"name": "final", "step": None, "weight": 1.0}],
              "documents_scored": 2, "seconds": 0.1, "ranked_by": "score",
              "records": [{"rank": 1, "score": 2.0, "cosine": 0.5, "records": [{"source": "s", "record_id": "f:3", "text": FACT}]}]}
    text = influence.summary(result)
    assert text.startswith("APPROXIMATION") and "NOTE: only the version's own (final) weights" in text
    assert "1. score +2 cosine +0.500  s record f:3: 'Memo: the Zorblax" in text
