"""Evaluation (`raylab eval`, `raylab models evaluate`): batch inference with Ray Data, and
the promotion gates a version must pass before it may become production.

    from raylab.evaluate import run_eval, evaluate_version
    report = run_eval(cfg)                                   # base vs tuned, eval/report.md
    result = evaluate_version(store, "acme-assistant", 3)    # the version's stored gates

    table = measure_bias(model, tok, cfg.eval.bias_probes)  # counterfactual bias probes (eval.bias_probes)

Modules: batch (actor-pool scoring and answering, the report), gates (the checks, their
result recorded on the version), suites (the prompt checks and budgets of a test suite, JUnit),
bias (counterfactual bias probes: the table, the max_bias_gap check).
"""

from __future__ import annotations

from raylab.evaluate.batch import (
    answers,
    held_out_items,
    held_out_loss,
    read_input,
    record_prompts,
    run_eval,
    score,
)
from raylab.evaluate.bias import markdown as bias_markdown
from raylab.evaluate.bias import measure as measure_bias
from raylab.evaluate.gates import derived_checks, evaluate_version, rag_checks
from raylab.evaluate.suites import describe, junit, write_junit

__all__ = ["answers", "bias_markdown", "derived_checks", "describe", "evaluate_version", "held_out_items", "held_out_loss", "junit", "measure_bias", "rag_checks", "read_input", "record_prompts",
           "run_eval", "score", "write_junit"]
