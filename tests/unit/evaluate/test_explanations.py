"""The model card's Explanations section (raylab/evaluate/explanations.py): it links the sweep's
hyperparameter importance, the bias probe table and the global explanation, and says how to
get whichever of them is missing."""

from __future__ import annotations

import json

from raylab.core import runs, storage
from raylab.evaluate import explanations


def _report() -> dict:
    cell = {"attribution_share": 0.5, "token_share": 0.25, "signed_share": 0.4, "lift": 2.0, "records": 2}
    return {"method": "feature_ablation", "parameters": {"baseline": "pad token"}, "target": "greedy answer",
            "unit": "share", "explained": 2, "skipped": [], "top_part": "question",
            "parts": {"question": cell, "template": cell | {"lift": 0.7}},
            "from_end": {"last token": {"attribution_share": 0.3, "token_share": 0.05}}}


def test_the_section_links_importance_bias_and_the_global_explanation(tmp_path):
    run = runs.Run(str(tmp_path))
    storage.write_text(run.tune_file("importance"), json.dumps(
        {"evaluator": "PED-ANOVA", "metric": "val_loss", "trials": 4, "importance": {"train.lr": 0.8, "model.lora.r": 0.2}}))
    imp, files = explanations.importance(str(tmp_path))
    assert list(files) == ["hyperparameter_importance.json"]  # no PNG written: none linked
    bias = {"max_gap": 0.12, "max_gap_probe": "gender/0", "flagged": []}
    text = explanations.card_section(_report(), imp, files, bias)
    assert "train.lr 0.80, model.lora.r 0.20" in text and "[hyperparameter_importance.json](hyperparameter_importance.json)" in text
    assert "hyperparameter_importance.png" not in text  # no PNG written: none linked
    assert "Largest gap 0.120 (gender/0); flagged: none" in text
    assert "![where the answers come from](global_explanation.png)" in text and "| question | 0.500 | 0.250 | 2.00 |" in text
    # the controls: without a sweep, probes or a global explanation the section says how to get each
    none = explanations.card_section(None, *explanations.importance(str(tmp_path / "nosweep")), None)
    assert "No sweep chose this version" in none and "set `eval.bias_probes`" in none
    assert "set `eval.global_explanation`" in none and ".png" not in none
    gated = explanations.card_section(None, None, {}, None, bias_in_card=True)  # the gates measured the probes
    assert "Measured by the promotion gates" in gated and "set `eval.bias_probes`" not in gated
