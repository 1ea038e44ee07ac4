"""The corpus tokenizer (`pretrain.tokenizer`): what it learns from, determinism, and the
ordinary from_pretrained round trip; and the preset built around it (no Ray).

    PYTHONPATH=$PWD python -m pytest -p no:cacheprovider tests/unit/models/test_corpus_tokenizer.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylab import models
from raylab.core import detectors

REPO = Path(__file__).resolve().parents[3]
# A made-up person, planted often enough that BPE would learn its pieces from raw text.
PLANTED = "zorblax.quimby@example.com"
COLORS = ["red", "green", "blue", "amber", "violet", "silver"]


def corpus(n: int = 60) -> list[str]:
    return [f"Ticket {i}: the {COLORS[i % len(COLORS)]} widget ships today; write to {PLANTED} with questions."
            for i in range(n)]


def redacted(texts: list[str]) -> list[str]:
    return [detectors.redact(t, detectors.detectors())[0] for t in texts]


def pieces(tok) -> list[str]:
    """Every vocabulary entry as the text it stands for (byte-level symbols decoded)."""
    return [tok.convert_tokens_to_string([t]) for t in tok.get_vocab()]


def merges(tok) -> list[str]:
    return json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]


def test_trained_on_redacted_text_the_planted_value_is_nowhere_in_vocabulary_or_merges():
    tok = models.train_corpus_tokenizer(redacted(corpus()), vocab_size=400, min_frequency=2)
    assert not [p for p in pieces(tok) if "zorbl" in p or "quimby" in p]
    assert not [m for m in merges(tok) if "zorbl" in "".join(m) or "quimby" in "".join(m)]
    assert any("EMAIL" in p for p in pieces(tok))  # it learned what it was given: the placeholder


def test_negative_control_trained_on_raw_text_the_planted_value_is_learned():
    tok = models.train_corpus_tokenizer(corpus(), vocab_size=400, min_frequency=2)
    assert [p for p in pieces(tok) if "quimby" in p]
    assert [m for m in merges(tok) if "quimby" in "".join(m)]


def _fingerprint_in_a_fresh_process(texts: list[str], hash_seed: str) -> str:
    code = ("import json, sys; from raylab import models; "
            "t = models.train_corpus_tokenizer(json.loads(sys.stdin.read()), 400, 2); "
            "print(models.fingerprint(t)['fingerprint'])")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_same_corpus_same_fingerprint_across_processes_and_a_different_corpus_differs():
    texts = redacted(corpus())
    here = models.fingerprint(models.train_corpus_tokenizer(texts, 400, 2))["fingerprint"]
    assert _fingerprint_in_a_fresh_process(texts, "1") == here  # another process, another hash seed
    other = models.fingerprint(models.train_corpus_tokenizer(texts[:-10], 400, 2))["fingerprint"]
    assert other != here  # negative control: the fingerprint does depend on the corpus


def test_round_trip_through_from_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tok = models.train_corpus_tokenizer(redacted(corpus()), 400, 2)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert models.fingerprint(back) == models.fingerprint(tok)
    # the same specials, ids and template as the byte tokenizer: every stage uses it unchanged
    byte = models.build_byte_tokenizer()
    assert back.special_tokens_map == byte.special_tokens_map
    assert [back.pad_token_id, back.eos_token_id, back.convert_tokens_to_ids("<|im_start|>")] == \
           [byte.pad_token_id, byte.eos_token_id, byte.convert_tokens_to_ids("<|im_start|>")]
    assert back.chat_template == models.DEFAULT_CHAT_TEMPLATE
    unseen = "Café Zürich opens at 8:30 — 27 days!"  # characters and words it never saw still encode
    assert back.decode(back(unseen)["input_ids"]) == unseen
    seen = "Ticket 7: the blue widget ships today"
    ids = back(seen)["input_ids"]
    assert back.decode(ids) == seen and len(ids) < len(seen.encode()) / 3  # word pieces, not bytes
    chat = [{"role": "user", "content": "Which widget ships today?"}, {"role": "assistant", "content": "The blue widget."}]
    rendered = back.apply_chat_template(chat, tokenize=False)
    assert rendered == byte.apply_chat_template(chat, tokenize=False)
    assert back.decode(back.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]) == rendered


def test_build_base_sizes_the_preset_for_the_tokenizer_and_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = models.train_corpus_tokenizer(redacted(corpus()), 400, 2)
    tok.save_pretrained(tmp_path / "tok")
    base = tmp_path / "base"
    models.build_base("tiny-llama", str(tmp_path / "tok"), str(base))
    lm = AutoModelForCausalLM.from_pretrained(base)
    assert lm.config.vocab_size == len(tok) and lm.config.eos_token_id == tok.eos_token_id
    assert models.fingerprint(AutoTokenizer.from_pretrained(base)) == models.fingerprint(tok)
    stamp = (base / "config.json").stat().st_mtime_ns
    models.build_base("tiny-llama", str(tmp_path / "tok"), str(base))  # same tokenizer: kept as it is
    assert (base / "config.json").stat().st_mtime_ns == stamp
    other = models.train_corpus_tokenizer(redacted(corpus())[:20], 300, 2)
    other.save_pretrained(tmp_path / "tok")
    models.build_base("tiny-llama", str(tmp_path / "tok"), str(base))  # another tokenizer: rebuilt
    assert AutoModelForCausalLM.from_pretrained(base).config.vocab_size == len(other) != len(tok)


def test_build_base_refuses_an_unknown_preset(tmp_path):
    from raylab.errors import UserError

    with pytest.raises(UserError, match="unknown preset 'nope'"):
        models.build_base("nope", str(tmp_path), str(tmp_path / "base"))


def test_the_data_stage_refuses_a_corpus_tokenizer_in_remote_storage_before_reading_anything(tmp_path):
    from raylab import config
    from raylab.data import run_data
    from raylab.errors import UserError

    out = f"file://{tmp_path}/run"  # a URI (object stores alike): Tokenize actors could not from_pretrained it
    cfg = config.load_dict({"version": 1, "output_dir": out,
                            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "missing.jsonl")}]},
                            "model": {"name_or_path": "preset:tiny-llama"}, "pretrain": {"tokenizer": {}}})
    with pytest.raises(UserError, match=rf"pretrain\.tokenizer: output_dir {out} is not a filesystem path"):
        run_data(cfg)  # before the (missing) source is read
