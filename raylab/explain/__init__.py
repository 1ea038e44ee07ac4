"""The explain stage: which prompt tokens a registered version's answer came from (token
attributions with captum; docs/explain.md). The serving endpoint's `POST /v1/explain` runs
`explain_ids` in its own deployment (raylab/serve/explainer.py).

    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "How do I reset my VPN token?"

    from raylab.explain import run_explain
    run_explain(cfg, "acme-assistant/3", "How do I reset my VPN token?", method="feature_ablation")
    # -> {"input_tokens", "output_tokens", "attributions" [output x input], "input_totals", ...}
    run_influence(cfg, "acme-assistant/3", "How do I reset my VPN token?")   # `raylab explain --influence`
    # -> {"approximation", "answer", "checkpoints", "records": [{rank, score, cosine, records: [...]}]}

    run_explain(cfg, "acme-assistant/3", "Reset it in the portal. Then log in.", method="feature_ablation",
                granularity="sentence")     # one attribution per sentence ("input_spans")
    run_explain(cfg, "acme-assistant/3", "How do I reset my VPN token?", method="shap")

    run_global(cfg, model_dir, items)   # `raylab eval`'s global explanation (eval.global_explanation)

Modules: stage (the verb: checks, load, prompt and target, result), attribute (captum:
integrated gradients per output token with its delta, feature ablation and Shapley
sampling through LLMAttribution, over tokens or spans), spans (sentences and character
offsets mapped to the rendered prompt's tokens), textshap (shap's TeacherForcing with a Text
masker), render (the text summary and the HTML view), influence (`--influence`: which
training records shaped the answer, TracIn-style; checkpoints, Ray Data over the train
shards, the join to data/records/) and tracin (its gradients, the actor), parts (which
prompt part, system, context, question or template, each token is in), aggregate (the global
explanation over a sample: shares by part and position, its plot and card section).
Needs the `explain` extra (captum, and shap for method shap): pip install 'raylab[explain]'.
"""

from __future__ import annotations

from raylab.explain.aggregate import explain_answer, explain_item, explain_sample, run_global
from raylab.explain.aggregate import markdown as global_markdown
from raylab.explain.aggregate import plot as global_plot
from raylab.explain.attribute import INSTALL, captum_attr
from raylab.explain.influence import run_influence
from raylab.explain.influence import summary as influence_summary
from raylab.explain.parts import PARTS
from raylab.explain.parts import label as prompt_parts
from raylab.explain.render import html as html_page
from raylab.explain.render import summary
from raylab.explain.spans import features as span_features
from raylab.explain.stage import explain_ids, run_explain
from raylab.explain.textshap import INSTALL_SHAP, shap_module

__all__ = ["INSTALL", "INSTALL_SHAP", "PARTS", "captum_attr", "explain_answer", "explain_ids", "explain_item",
           "explain_sample", "global_markdown", "global_plot", "html_page", "influence_summary", "prompt_parts",
           "run_explain", "run_global", "run_influence", "shap_module", "span_features", "summary"]
