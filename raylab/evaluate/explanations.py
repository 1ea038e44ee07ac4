"""What `raylab eval` writes about why the model answers as it does (`eval.global_explanation`),
and the model card's "Explanations" section that links it with the sweep's hyperparameter
importance and the bias probe table.

    raylab eval configs/quickstart.yaml --model acme-assistant@production   # + the card section

The global explanation itself is raylab.explain's (aggregate.py): attributions of the tuned
model's answers over the first `eval.global_explanation.samples` prompts `raylab eval` answers
(the held-out split, or --input), shares by prompt part and position. It is written to
`<output_dir>/eval/global_explanation.json` and `.png`; for a registry version, both files are
also logged beside its card (under card/) and the section links them by name, so the card
keeps them when the run directory is gone (`raylab models card REF --output DIR` copies them).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from raylab import explain, registry
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.evaluate import bias as bias_

log = logging.getLogger(__name__)

CARD_SECTION = "Explanations"
FILES = {"json": runs.EVAL_FILES["global_explanation"], "png": runs.EVAL_FILES["global_explanation_png"],
         "importance": "hyperparameter_importance.json", "importance_png": "hyperparameter_importance.png"}


def run_global(cfg: RaylabConfig, path: str, items: list[dict], label: str) -> dict[str, Any]:
    """The tuned model's global explanation over `items`, written with its plot under eval/."""
    report = explain.run_global(cfg, path, items) | {"model": label}
    run = runs.Run(cfg.output_dir)
    storage.write_text(run.eval_file("global_explanation"), json.dumps(report, indent=2) + "\n")
    explain.global_plot(report, run.eval_file("global_explanation_png"),
                        title=f"{label}: where the answers come from ({report['method']}, {report['explained']} records)")
    log.info(f"eval: global explanation -> {run.eval_file('global_explanation')} (+ .png)")
    return report


def importance(run_dir: str) -> tuple[dict | None, dict[str, str]]:
    """The sweep's hyperparameter importance in the run that registered a version (its
    tune/importance.json, None without a sweep) and its files by the names the card gives them."""
    run = runs.Run(run_dir)
    location = run.tune_file("importance")
    if not storage.exists(location):
        return None, {}
    files = {FILES["importance"]: location}
    if storage.exists(run.tune_file("importance_png")):
        files[FILES["importance_png"]] = run.tune_file("importance_png")
    return json.loads(storage.read_text(location)), files


def card_section(report: dict | None, imp: dict | None, imp_files: dict[str, str], bias: dict | None,
                 bias_in_card: bool = False) -> str:
    """The Markdown of the card's Explanations section (links relative to the card's folder).
    `bias`: the tuned model's bias table measured now; `bias_in_card`: the card has a Bias
    probes section already (the gates measured it)."""
    lines = ["What the version's answers rest on, and what shaped it: the sweep's hyperparameter importance, the "
             "counterfactual bias probes and where in the prompt the answers come from.", "", "### Hyperparameter importance", ""]
    if imp is None:
        lines.append("No sweep chose this version (no tune/importance.json in its run): nothing to rank.")
    else:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in imp["importance"].items())
        lines.append(f"{imp['evaluator']} over {imp['trials']} trials, for {imp['metric']}: {ranked}. "
                     f"Numbers: [{FILES['importance']}]({FILES['importance']}).")
        if FILES["importance_png"] in imp_files:
            lines += ["", f"![hyperparameter importance]({FILES['importance_png']})"]
    lines += ["", "### Bias probes", ""]
    if bias is None and bias_in_card:
        lines.append("Measured by the promotion gates: the table is the card's Bias probes section.")
    elif bias is None:
        lines.append("Not measured: set `eval.bias_probes` (`{}` runs the shipped gender, age and nationality sets).")
    else:
        lines.append(f"Largest gap {bias['max_gap']:.3f} ({bias['max_gap_probe']}); flagged: "
                     f"{', '.join(bias['flagged']) or 'none'}. The table is the card's Bias probes section.")
    lines += ["", "### Global explanation", ""]
    if report is None:
        lines.append("Not measured: set `eval.global_explanation` (`{}` explains 16 held-out records).")
    else:
        lines += [explain.global_markdown(report), "",
                  f"![where the answers come from]({FILES['png']}) Numbers: [{FILES['json']}]({FILES['json']})."]
    return "\n".join(lines)


def add_to_card(cfg: RaylabConfig, store, ref: str, report: dict | None, bias_tables: dict | None) -> None:
    """The Explanations section of a registry version's card, with the files it links."""
    mv = registry.get_version(store, ref)
    imp, imp_files = importance(registry.version_run(mv) or cfg.output_dir)
    run = runs.Run(cfg.output_dir)
    files = dict(imp_files)
    if report is not None:
        files |= {FILES["json"]: run.eval_file("global_explanation"), FILES["png"]: run.eval_file("global_explanation_png")}
    bias_in_card = bias_.CARD_SECTION in registry.card_for(store, mv).get("extra_sections", {})
    section = card_section(report, imp, imp_files, (bias_tables or {}).get("tuned"), bias_in_card)
    registry.add_card_section(store, mv.name, int(mv.version), CARD_SECTION, section, files=files)
    log.info(f"eval: Explanations section added to the model card of {mv.name}/{mv.version}")
