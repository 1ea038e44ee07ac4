"""The optimize stage: a registered version made cheaper to serve, registered as a new
version derived from it: weight quantisation with torchao, or structured pruning with a
recovery fine-tune on Ray Train, or knowledge distillation into a smaller student on Ray
Train (docs/optimize.md).

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.quantize=int8_weight_only

    from raylab.optimize import run_optimize
    run_optimize(cfg, "acme-assistant/3")    # -> {"name", "version", "derived_from", "quantized_layers", ...}
    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.prune.heads=0.25 optimize.prune.mlp_channels=0.3
    raylab optimize configs/quickstart.yaml --model acme-assistant/3 'optimize.distill.student={num_hidden_layers: 2}'

Modules: stage (the verb: load and merge REF, quantise, save, register), quantize (torchao's
`quantize_` with a module filter, the count of layers changed, the saveable format), prune
(Wanda-style scores, whole heads / key-value groups and MLP channels sliced out of Llama-family
blocks), recover (calibration rows, the recovery fine-tune through `raylab.train`, register),
distill (the student, the nested run trained with train.objective=distill, register), measure
and report (every result against its parent: size, parameters, peak memory at load, tokens/s at
concurrency 1 and 16, eval loss and ROUGE-L through evaluate's scorers; recorded as version
tags, a card section and <output_dir>/optimize/report.{json,md,png}; registry.gates.min_speedup
and max_quality_drop judge them in `raylab models evaluate`).
Quantisation needs the `optimize` extra (torchao): pip install 'raylab[optimize]'; pruning
and distillation need only torch and transformers.
"""

from __future__ import annotations

from raylab.optimize.distill import DISTILLED_TAG
from raylab.optimize.recover import PRUNED_TAG
from raylab.optimize.stage import QUANTIZED_TAG, check_config, run_optimize

__all__ = ["DISTILLED_TAG", "PRUNED_TAG", "QUANTIZED_TAG", "check_config", "run_optimize"]
