"""`raylab train` on a config with a `pretrain` section whose base is not there yet: the
pretrain stage runs first (as `raylab run` would), instead of the command failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import with_data
from raylab import config, train
from raylab.core import events, runs
from raylab.train import pretrain

pytestmark = pytest.mark.integration


def test_train_pre_trains_first_when_the_base_is_missing(learn_data, tmp_path):
    raw = with_data(learn_data, tmp_path / "run", max_steps=2, eval_every=2, log_every=1).model_dump(mode="json")
    raw["pretrain"] = {"max_steps": 2, "batch_size": 4}
    cfg = config.load_dict(raw)
    assert pretrain.missing(cfg)
    meta = train.run_train(cfg)
    base = Path(pretrain.base_dir(cfg))
    assert not pretrain.missing(cfg) and (base / "config.json").exists()
    # the adapter was trained on the pre-trained base, not on the preset
    assert json.loads((Path(cfg.output_dir) / "train" / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base)
    assert meta["steps"] == 2
    stages = [(e["kind"], e["fields"].get("stage")) for e in events.read(runs.Run(cfg.output_dir).events)
              if e["kind"].startswith("stage.")]
    assert stages == [("stage.start", "train"), ("stage.start", "pretrain"), ("stage.end", "pretrain"),
                      ("stage.end", "train")], stages


PLANTED = "zorblax.quimby@example.com"  # a made-up person's address, in the raw corpus only


def _pieces(tok) -> list[str]:
    return [tok.convert_tokens_to_string([t]) for t in tok.get_vocab()]


def test_a_corpus_tokenizer_is_trained_on_redacted_text_and_becomes_the_pre_trained_bases(tmp_path, ray_local):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import base_config
    from raylab import data, models

    corpus = tmp_path / "docs.jsonl"
    lines = [f"Ticket {i}: the {c} widget ships today; questions to {PLANTED}." for i, c in
             enumerate(["red", "green", "blue", "amber"] * 15)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    raw = base_config(tmp_path / "run", corpus, max_steps=2, eval_every=2, log_every=1)
    raw["pretrain"] = {"max_steps": 2, "batch_size": 4, "tokenizer": {"vocab_size": 400}}
    cfg = config.load_dict(raw)
    manifest = data.run_data(cfg)
    run = runs.Run(cfg.output_dir)
    tok = AutoTokenizer.from_pretrained(run.tokenizer)  # the ordinary path a user's tokenizer takes
    assert manifest["pii_redactions"].get("EMAIL") == len(lines)
    assert not [p for p in _pieces(tok) if "zorbl" in p or "quimby" in p]
    assert any("EMAIL" in p for p in _pieces(tok))  # it learned the placeholder it was given
    # negative control: the same trainer on the raw lines learns the planted address
    assert [p for p in _pieces(models.train_corpus_tokenizer(lines, 400, 2)) if "quimby" in p]
    assert manifest["tokenizer"]["fingerprint"] == models.fingerprint(tok)["fingerprint"]
    assert manifest["tokenizer"]["vocab_size"] == len(tok) < 400 + 1
    # the same corpus again: a cache hit with the same tokenizer
    again = data.run_data(cfg)
    assert again["cache"]["hit"] and again["tokenizer"] == manifest["tokenizer"]

    meta = train.run_pretrain(cfg)
    base = Path(pretrain.base_dir(cfg))
    assert meta["steps"] == 2 and meta["base_model"] == runs.Run(cfg.output_dir).pretrain.base
    assert AutoModelForCausalLM.from_pretrained(base).config.vocab_size == len(tok)
    assert models.fingerprint(AutoTokenizer.from_pretrained(base))["fingerprint"] == manifest["tokenizer"]["fingerprint"]
