"""The optimize stage: a registered version made cheaper to serve, registered as a new
version derived from it. Today: weight quantisation with torchao (docs/optimize.md).

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.quantize=int8_weight_only

    from raylab.optimize import run_optimize
    run_optimize(cfg, "acme-assistant/3")    # -> {"name", "version", "derived_from", "quantized_layers", ...}

Modules: stage (the verb: load and merge REF, quantise, save, register), quantize (torchao's
`quantize_` with a module filter, the count of layers changed, the saveable format).
Needs the `optimize` extra (torchao): pip install 'raylab[optimize]'.
"""

from __future__ import annotations

from raylab.optimize.stage import QUANTIZED_TAG, run_optimize

__all__ = ["QUANTIZED_TAG", "run_optimize"]
