"""optimize.distill's checks and student on tiny objects, no Ray (the training itself:
tests/integration/test_distill.py): a student whose tokenizer differs from the teacher's is
refused naming optimize.distill.student, the same tokenizer is accepted (the negative control);
a mapping of config keys shrinks the teacher's architecture (an unknown key is refused naming
it); a preset student is sized for the teacher's tokenizer; bad values of the section exit 2
naming the key; the student's train config selects the distill objective."""

from __future__ import annotations

import pytest
import yaml

from raylab import config, models
from raylab.cli import main
from raylab.core import runs
from raylab.errors import ConfigError, UserError
from raylab.optimize import distill

TEXTS = ["the red widget ships today", "a blue one ships next week", "green widgets are out of stock again"] * 20


@pytest.fixture(scope="module")
def tok():
    return models.build_byte_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    return models.build_tiny_model("tiny-llama", tok, seed=7)


def test_a_student_with_another_tokenizer_is_refused_and_the_same_one_accepted(tmp_path, tok, teacher):
    other = models.train_corpus_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    assert distill.tokenizer_mismatch(tok, other) == ["vocab_size", "vocab_hash"]
    with pytest.raises(UserError, match=r"optimize\.distill\.student=x: its tokenizer differs from the teacher's "
                                        r"\(vocab_size, vocab_hash differ"):
        distill.check_tokenizer(tok, other, "x")
    assert distill.tokenizer_mismatch(tok, models.build_byte_tokenizer()) == []  # negative control: a fresh copy
    distill.check_tokenizer(tok, models.build_byte_tokenizer(), "x")

    # as a student directory: refused before its weights are loaded; with the teacher's tokenizer, loaded
    alien, same = tmp_path / "alien", tmp_path / "same"
    for d, t in ((alien, other), (same, tok)):
        t.save_pretrained(d)
        models.build_tiny_model("tiny-llama", t, seed=1).save_pretrained(d)
    with pytest.raises(UserError, match=rf"optimize\.distill\.student={alien}: its tokenizer differs"):
        distill.build_student(str(alien), teacher, tok, seed=0)
    student, described = distill.build_student(str(same), teacher, tok, seed=0)
    assert described == str(same) and student.config.num_hidden_layers == 2


def test_a_mapping_shrinks_the_teachers_architecture_and_a_preset_is_built_for_its_tokenizer(tok, teacher):
    student, described = distill.build_student({"num_hidden_layers": 1, "intermediate_size": 64}, teacher, tok, seed=0)
    c, t = student.config, teacher.config
    assert (c.num_hidden_layers, c.intermediate_size, c.hidden_size, c.vocab_size) == (1, 64, t.hidden_size,
                                                                                         t.vocab_size)
    assert (t.num_hidden_layers, t.intermediate_size) == (2, 128)  # the teacher's config is not touched
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert described == "the teacher's architecture with num_hidden_layers=1, intermediate_size=64"
    again, _ = distill.build_student({"num_hidden_layers": 1, "intermediate_size": 64}, teacher, tok, seed=0)
    assert all((a == b).all() for a, b in zip(student.parameters(), again.parameters(), strict=True))  # seeded

    narrow, _ = distill.build_student({"hidden_size": 32}, teacher, tok, seed=0)  # head_dim follows: 32 / 4 heads
    assert narrow.config.head_dim == 8 and narrow.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    with pytest.raises(UserError, match=r"optimize\.distill\.student\.num_layers: not a key of the teacher's config "
                                        r"\(model_type llama\); the ones that size it: num_hidden_layers"):
        distill.build_student({"num_layers": 1}, teacher, tok, seed=0)

    preset, described = distill.build_student("preset:tiny-gpt2", teacher, tok, seed=0)
    assert preset.config.model_type == "gpt2" and preset.config.vocab_size == len(tok)
    assert described == "preset:tiny-gpt2 (random weights)"
    with pytest.raises(UserError, match=r"optimize\.distill\.student: unknown preset 'huge'"):
        distill.build_student("preset:huge", teacher, tok, seed=0)


def raw(tmp_path, **distill_section) -> dict:
    return {"version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
            "registry": {"model_name": "widgets"}, "optimize": {"distill": distill_section}}


def test_bad_values_exit_2_naming_the_key_and_the_students_run_selects_the_objective(tmp_path, capsys):
    for section, key in (({"student": "preset:tiny-llama", "alpha": 1.5}, "optimize.distill.alpha"),
                         ({"student": "preset:tiny-llama", "alpha": -0.1}, "optimize.distill.alpha"),
                         ({"student": "preset:tiny-llama", "temperature": 0}, "optimize.distill.temperature"),
                         ({"student": "preset:tiny-llama", "temperature": -2}, "optimize.distill.temperature"),
                         ({"student": {}}, "optimize.distill.student"), ({}, "optimize.distill.student"),
                         ({"student": "preset:tiny-llama", "temp": 2}, "optimize.distill.temp")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.load_dict(raw(tmp_path, **section))
    both = raw(tmp_path, student="preset:tiny-llama")
    both["optimize"]["prune"] = {"heads": 0.5}
    with pytest.raises(ConfigError, match=r"optimize\.distill: set together with optimize\.prune"):
        config.load_dict(both)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw(tmp_path, student="preset:tiny-llama")))
    assert main(["optimize", str(path), "--model", "widgets/1", "optimize.distill.alpha=2"]) == 2
    assert "optimize.distill.alpha" in capsys.readouterr().err

    cfg = config.load_dict(raw(tmp_path, student={"num_hidden_layers": 1}, steps=8, lr=3e-3, alpha=0.25))
    assert (cfg.optimize.distill.temperature, cfg.optimize.distill.eval_samples) == (2.0, 32)  # the defaults
    nested = runs.Run(cfg.output_dir).optimize("distill-widgets-1-abc")
    student_cfg = distill.distill_config(cfg, nested)
    t = student_cfg.train
    assert (t.objective, t.max_steps, t.lr, t.eval_every) == ("distill", 8, 3e-3, 4)
    assert (student_cfg.model.name_or_path, student_cfg.model.method) == (nested.base, "full")
    assert student_cfg.optimize.distill == cfg.optimize.distill and student_cfg.output_dir == nested.root
    assert not student_cfg.registry.enabled
    assert distill.distill_config(config.load_dict(raw(tmp_path, student="x")), nested).train.lr == cfg.train.lr
