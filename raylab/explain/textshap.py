"""SHAP values of an answer: `shap.models.TeacherForcing` scores each output token given the
prompt and the output tokens before it, a `shap.maskers.Text` masker hides prompt tokens, and
shap's partition explainer (its default for text: Owen values over a hierarchical clustering
of the tokens) attributes each output token's score to the prompt's tokens.

    rows, base = shap_values(model, tok, prompt_ids, target_ids, baseline_id=pad, max_evals=300)
    # rows: [len(target_ids)][len(prompt_ids)] floats; base: each output token's score with every token hidden

What shap explains is its own score, the log odds logit(p) of each output token (not log p as
the captum methods); the result says so. As with the captum methods, the ids raylab rendered
are the features, not a re-tokenized string: the masker's tokenizer returns those ids with
their character offsets in the rendered text, the masker hands out token ids (a hidden token
becomes the baseline token, as in feature ablation), and `IdsTeacherForcing` feeds them to the
model as they are (shap's own would re-tokenize text, adding special tokens to a rendered chat).

Needs shap 0.51 (the explain extra; shap >= 0.52 needs Python 3.12). Its first explanation in a
process also compiles shap's numba kernels (seconds); later ones are milliseconds per evaluation.
"""

from __future__ import annotations

from raylab.errors import UserError
from raylab.explain.spans import offsets

INSTALL_SHAP = ("pip install 'raylab[explain]' (shap 0.51, which needs Python >= 3.11; newer shap releases "
                "need Python 3.12)")


def shap_module():
    """The shap package, or exit 2 naming the extra that installs it."""
    try:
        import shap
    except ImportError:
        raise UserError(f"method shap needs the shap package, which is not installed: {INSTALL_SHAP}") from None
    return shap


def shap_values(model, tok, prompt: list[int], target: list[int], baseline_id: int,
                max_evals: int) -> tuple[list[list[float]], list[float]]:
    """([output x input] SHAP values of each output token's log odds, the base value of each)."""
    import numpy as np
    import torch
    from transformers import BatchEncoding

    shap = shap_module()
    text = tok.decode(prompt)
    spans = offsets(tok, prompt)

    def tokenize(s, **_):
        # the rendered prompt is the one string explained; anything else (shap probes "" for
        # a tokenizer's prefix and suffix tokens) has no tokens, so every prompt token is a feature
        if s == text:
            return {"input_ids": list(prompt), "offset_mapping": spans}
        return {"input_ids": [], "offset_mapping": []}

    class IdsTeacherForcing(shap.models.TeacherForcing):
        def get_inputs(self, X, padding_side="left"):  # masked ids in, no re-tokenization
            ids = torch.tensor(np.asarray(X, dtype=np.int64), device=model.device)
            return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    scorer = IdsTeacherForcing(model, tok)
    if len(prompt) == 1:
        # shap's partition explainer cannot cluster a single token; one player's Shapley value
        # is exactly its score with the token minus without it, which the same scorer gives
        with torch.no_grad():
            both = scorer(np.array([prompt, [baseline_id]]), np.array([target, target]))
        return [[float(v)] for v in both[0] - both[1]], [float(v) for v in both[1]]
    masker = shap.maskers.Text(tokenize, mask_token=int(baseline_id), collapse_mask_token=False,
                               output_type="token_ids")
    explainer = shap.Explainer(scorer, masker, algorithm="partition")
    # too few evaluations leave clusters of neighbouring tokens unsplit: they share one value
    with torch.no_grad():
        found = explainer([text], [np.array(target)], max_evals=int(max_evals), silent=True)
    values = np.asarray(found.values[0], dtype=np.float64).reshape(len(prompt), len(target))
    base = np.asarray(found.base_values[0], dtype=np.float64).reshape(len(target))
    if not np.isfinite(values).all():
        raise UserError("method shap: the log odds overflowed (a probability of exactly 0 or 1 in float64); "
                        "use integrated_gradients or feature_ablation for this answer")
    return values.T.tolist(), base.tolist()
