"""The inference-loading seam (`models.load`): a base directory, a full fine-tune, an adapter
onto its base, `base=True`, a registry version with its checksums verified, and refs that
name nothing. Tiny random models saved locally; no hub, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylab import models, registry
from raylab.core import runs
from raylab.errors import UserError
from registry_helpers import META, cfg_for, open_test_store

IDS = torch.tensor([[5, 60, 70, 80, 90, 100]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """base/ (a plain HF directory), full/ (a 'full fine-tune' of it: other weights and a
    raylab_train.json naming base/) and adapter/ (a LoRA on base/ with non-zero B, so the
    adapter changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("inference")
    tok = models.build_byte_tokenizer()
    base = root / "base"
    tok.save_pretrained(base)
    models.build_tiny_model("tiny-llama", tok, seed=1).save_pretrained(base)

    full = root / "full"
    tok.save_pretrained(full)
    models.build_tiny_model("tiny-llama", tok, seed=2).save_pretrained(full)
    (full / runs.TRAIN_META).write_text(json.dumps({"base_model": "preset:tiny-llama", "base_model_path": str(base)}))

    adapter = root / "adapter"
    torch.manual_seed(3)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    return {"base": base, "full": full, "adapter": adapter}


def test_a_plain_base_directory_loads_as_itself(dirs):
    from transformers import AutoModelForCausalLM

    inf = models.load(str(dirs["base"]))
    assert (inf.kind, inf.base, inf.path, inf.ref) == ("base", str(dirs["base"]), str(dirs["base"]), None)
    assert not inf.model.training and inf.tokenizer.pad_token_id is not None
    torch.testing.assert_close(logits(inf.model), logits(AutoModelForCausalLM.from_pretrained(dirs["base"])),
                               rtol=0, atol=0)
    assert models.identify(str(dirs["base"])) == ("base", str(dirs["base"]))


def test_a_full_fine_tune_loads_its_weights_and_base_true_gives_its_base(dirs):
    from transformers import AutoModelForCausalLM

    full, base = str(dirs["full"]), str(dirs["base"])
    inf = models.load(full)
    assert (inf.kind, inf.base) == ("full", base)
    torch.testing.assert_close(logits(inf.model), logits(AutoModelForCausalLM.from_pretrained(full)), rtol=0, atol=0)
    trained_from = models.load(full, base=True)
    assert (trained_from.kind, trained_from.base, trained_from.path) == ("base", base, full)
    torch.testing.assert_close(logits(trained_from.model), logits(AutoModelForCausalLM.from_pretrained(base)),
                               rtol=0, atol=0)
    # negative control: the two really are different models
    assert not torch.allclose(logits(inf.model), logits(trained_from.model))


def test_an_adapter_goes_onto_its_base_like_peft_loads_it(dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, base = str(dirs["adapter"]), str(dirs["base"])
    inf = models.load(adapter)
    assert (inf.kind, inf.base) == ("adapter", base) and models.identify(adapter) == ("adapter", base)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    torch.testing.assert_close(logits(inf.model), logits(reference), rtol=0, atol=0)
    plain = models.load(adapter, base=True)
    assert plain.kind == "base" and not isinstance(plain.model, PeftModel)
    torch.testing.assert_close(logits(plain.model), logits(AutoModelForCausalLM.from_pretrained(base)), rtol=0, atol=0)
    assert not torch.allclose(logits(inf.model), logits(plain.model))  # the adapter changes the output


def test_load_inference_keeps_its_model_tokenizer_form(dirs):
    model, tok = models.load_inference(str(dirs["adapter"]), tokenizer_path=str(dirs["full"]), base=True)
    torch.testing.assert_close(logits(model), logits(models.load(str(dirs["base"])).model), rtol=0, atol=0)
    assert tok.get_vocab() == models.load_saved_tokenizer(str(dirs["full"])).get_vocab()


def test_a_relative_directory_shaped_like_a_ref_is_a_path_when_written_as_one(dirs, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(dirs["base"], tmp_path / "acme" / "3")
    monkeypatch.chdir(tmp_path)
    assert models.is_registry_ref("acme/3") and models.is_registry_ref("acme@production")
    assert not any(models.is_registry_ref(r) for r in ("./acme/3", str(tmp_path / "acme" / "3"), "org/model",
                                                       "runs/q/train/final", "preset:tiny-llama"))
    assert models.load("./acme/3").kind == "base"
    assert models.load_inference("acme/3")[0] is not None  # a path-taking caller keeps its path


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


def _register(store, tmp_path, final: Path) -> str:
    exp = registry.experiment_id(store, "widgets")
    run_id = registry.log_run(store, exp, name="r1", key="k1", params={}, history=[], artifacts={}, tags={})
    mv = registry.register(store, cfg_for(tmp_path), run_id, str(final), META)
    return f"widgets/{mv.version}"


def test_a_registry_version_loads_verified_and_a_corrupted_one_is_refused(dirs, store, tmp_path):
    ref = _register(store, tmp_path, dirs["adapter"])
    inf = models.load(ref, store=store)  # negative control: the registered artifact loads
    assert (inf.kind, inf.base, inf.ref) == ("adapter", str(dirs["base"]), ref)
    assert Path(inf.path) == runs.home().registry_cache("widgets", 1)
    torch.testing.assert_close(logits(inf.model), logits(models.load(str(dirs["adapter"])).model), rtol=0, atol=0)
    assert models.locate(ref, store) == inf.path

    weights = Path(store.client.get_model_version("widgets", "1").source) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.IntegrityError, match=r"widgets/1: .*adapter_model\.safetensors \(sha256"):
        models.load(ref, store=store)


def test_unknown_refs_are_user_errors_naming_them(store, tmp_path):
    with pytest.raises(UserError, match="no registered model 'nope'"):
        models.load("nope/1", store=store)
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(UserError, match=f"model '{missing}': no model directory there"):
        models.load(missing)
    with pytest.raises(UserError, match="model './gone': no model directory there"):
        models.load("./gone")


def test_export_merges_a_registry_version_through_the_seam(dirs, store, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = _register(store, tmp_path, dirs["adapter"])
    out = models.export(ref, str(tmp_path / "merged"), merge=True, store=store)
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)),
                               logits(models.load(str(dirs["adapter"])).model), rtol=1e-4, atol=1e-5)
    assert json.loads((out / runs.TRAIN_META).read_text())["merged_base"] == str(dirs["base"])
    copied = models.export(ref, str(tmp_path / "copied"), store=store)  # without --merge: the files as registered
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in dirs["adapter"].iterdir())
    with pytest.raises(UserError, match="no registered model 'nope'"):
        models.export("nope/1", str(tmp_path / "never"), store=store)


def test_weights_only_for_a_directory_without_a_tokenizer(dirs, tmp_path):
    """A serving replica's shared base: `with_tokenizer=False` needs no tokenizer files."""
    weights_only = tmp_path / "weights"
    models.build_tiny_model("tiny-llama", models.build_byte_tokenizer(), seed=1).save_pretrained(weights_only)
    got = models.load(str(weights_only), with_tokenizer=False)
    assert got.tokenizer is None and got.kind == "base"
    assert torch.equal(logits(got.model), logits(models.load(str(dirs["base"])).model))  # the same seed-1 weights
    with pytest.raises(ValueError, match="tokenizer"):  # the control: by default the tokenizer is required
        models.load(str(weights_only))


def test_export_a_registry_version_in_bf16(dirs, store, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref = _register(store, tmp_path, dirs["adapter"])
    out = models.export(ref, str(tmp_path / "bf16"), merge=True, store=store, dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / runs.TRAIN_META).read_text())["export_dtype"] == "bfloat16"
    merged32 = logits(models.load(str(dirs["adapter"])).model)
    bf16 = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    torch.testing.assert_close(bf16, merged32, rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits
    assert models.identify(str(out))[0] == "full"  # served and loaded as the merged model it is
    full = models.export(str(dirs["full"]), str(tmp_path / "full16"), dtype="float16")
    assert next(AutoModelForCausalLM.from_pretrained(full).parameters()).dtype == torch.float16
    with pytest.raises(UserError, match="--dtype bfloat16: .* is an adapter; .* Add --merge"):
        models.export(ref, str(tmp_path / "never"), store=store, dtype="bfloat16")
