"""The packing contract, checked on a real (tiny) model: no token sees another document."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raylab.config import ModelConfig
from raylab.data import packing
from raylab.models import load_model, load_tokenizer


def _packed(tok, texts, seq_len):
    docs = [packing.encode_text(tok, t) for t in texts]
    table = pa.table({"input_ids": [d[0] for d in docs], "labels": [d[1] for d in docs]})
    return docs, packing.pack_batch(table, seq_len, tok.pad_token_id, "pack").to_pylist()


def test_packed_logits_equal_each_document_alone(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="eager")
    tok, model = load_tokenizer(cfg), load_model(cfg).eval()
    texts = ["Acme pays on the 25th.", "Help desk: room 204.", "Vacation: 27 days a year, plus holidays."]
    docs, rows = _packed(tok, texts, seq_len=128)
    assert len(rows) == 1 and max(rows[0]["segment_ids"]) == 3  # all three share one sequence
    row = rows[0]
    mask = torch.tensor(packing.attention_mask(np.array(row["segment_ids"])))
    # A 4D additive mask: 0 where allowed, -inf elsewhere (padding rows attend to nothing real).
    bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[None, None]
    ids = torch.tensor([row["input_ids"]])
    pos = torch.tensor([row["position_ids"]])
    with torch.no_grad():
        packed_logits = model(input_ids=ids, attention_mask=bias, position_ids=pos).logits[0]
        segs = np.array(row["segment_ids"])
        for seg, (doc_ids, _) in enumerate(sorted(docs, key=lambda d: -len(d[0])), start=1):
            alone = model(input_ids=torch.tensor([doc_ids])).logits[0]
            where = np.flatnonzero(segs == seg)
            assert torch.allclose(packed_logits[where], alone, atol=1e-5), f"segment {seg} saw another document"


def test_unmasked_packing_would_leak(tiny_model_dir):
    """The check above has teeth: a plain causal mask over the packed row changes logits."""
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="eager")
    tok, model = load_tokenizer(cfg), load_model(cfg).eval()
    docs, rows = _packed(tok, ["First document here.", "Second one."], seq_len=64)
    row = rows[0]
    segs = np.array(row["segment_ids"])
    second = np.flatnonzero(segs == 2)
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([row["input_ids"]])).logits[0][second]
        alone = model(input_ids=torch.tensor([sorted(docs, key=lambda d: -len(d[0]))[1][0]])).logits[0]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_labels_and_boundaries(tiny_model_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    docs, rows = _packed(tok, ["a" * 40, "b" * 30, "c" * 20, "d" * 50], seq_len=64)
    assert sum(r["num_tokens"] for r in rows) == sum(len(d[0]) for d in docs)
    for r in rows:
        segs = np.array(r["segment_ids"])
        labels = np.array(r["labels"])
        assert (labels[segs == 0] == -100).all() and (np.array(r["input_ids"])[segs == 0] == tok.pad_token_id).all()
        starts = [i for i in range(64) if segs[i] and (i == 0 or segs[i - 1] != segs[i])]
        assert all(labels[i] == -100 and r["position_ids"][i] == 0 for i in starts)
    padded = packing.pack_batch(pa.table({"input_ids": [d[0] for d in docs], "labels": [d[1] for d in docs]}),
                                64, tok.pad_token_id, "pad").to_pylist()
    assert len(padded) == 4 and all(max(r["segment_ids"]) == 1 for r in padded)


def test_chat_labels_cover_only_the_answers(tiny_model_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Payday?"},
                {"role": "assistant", "content": "The 25th."}, {"role": "user", "content": "Hours?"},
                {"role": "assistant", "content": "8:30-17:30."}]
    ids, labels = packing.encode_chat(tok, messages, train_on_prompt=False)
    targets = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert targets == "The 25th.<|im_end|>8:30-17:30.<|im_end|>"
    # A template without {% generation %} tags: the answers are found by rendering prefixes.
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids2, labels2 = packing.encode_chat(tok, messages, train_on_prompt=False)
    assert ids2 == ids
    assert tok.decode([t for t, lab in zip(ids2, labels2, strict=True) if lab != -100]).startswith("The 25th.<|im_end|>")
    all_ids, all_labels = packing.encode_chat(tok, messages, train_on_prompt=True)
    assert all_labels == all_ids


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"file.jsonl:{i}" for i in range(2000)]
    val = [packing.in_val(i, 0, 0.1) for i in ids]
    assert val == [packing.in_val(i, 0, 0.1) for i in ids]
    assert 150 < sum(val) < 250
    assert val != [packing.in_val(i, 1, 0.1) for i in ids]


def test_a_val_source_is_held_out_whole_and_others_keep_their_split():
    """data.val_sources (a fine-tuning job's validation file): every record of the named source
    is in val, at any fraction; another source's records keep the seeded split (the control)."""
    ids = [f"r{i}" for i in range(200)]
    assert all(packing.in_val(i, 0, 0.0, "validation_file", ["validation_file"]) for i in ids)
    assert [packing.in_val(i, 0, 0.1, "training_file", ["validation_file"]) for i in ids] == \
        [packing.in_val(i, 0, 0.1) for i in ids]
    assert not any(packing.in_val(i, 0, 0.0, "training_file", ["validation_file"]) for i in ids)
