"""`raylab explain CONFIG --model REF --prompt TEXT`: which prompt tokens each token of an
answer came from, for a registered version (or any REF `models.load` takes).

    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "How do I reset my VPN token?"
    raylab explain configs/quickstart.yaml --model acme-assistant@production --prompt "..." \
        --target "Open the portal." --method feature_ablation --json
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "..." --html why.html

Steps: check the request against `explain.*` before loading anything that can be checked
(method, counts), load REF through `models.load` (checksums verified), render the prompt as
training and serving do (`models.prompt_ids`), take the target given or the model's own
greedy answer (`models.greedy_ids`, up to explain.max_target_tokens), attribute (attribute.py),
and write the HTML view through core.storage when asked.
"""

from __future__ import annotations

import logging
import time

from raylab import models, registry
from raylab.config import EXPLAIN_METHODS, SPAN_METHODS, RaylabConfig
from raylab.core import storage
from raylab.errors import UserError
from raylab.explain import attribute, render, spans, textshap

log = logging.getLogger(__name__)


def baseline_id(tok, which: str) -> int:
    """The id of the token that stands for 'absent' (explain.baseline)."""
    found = {"pad": tok.pad_token_id, "unk": tok.unk_token_id, "eos": tok.eos_token_id}[which]
    if found is None:
        raise UserError(f"explain.baseline: the tokenizer has no {which} token; choose another of pad, unk, eos")
    return int(found)


def pieces(tok, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (byte-level markers such as 'Ġ' decoded)."""
    return [tok.decode([i]) for i in ids]


def prompt_item(prompt: str | None, messages: list | None, completion: bool) -> dict:
    """The prompt as `models.prompt_ids` takes it; exit 2 for an empty or missing one."""
    if messages is not None:
        if prompt is not None:
            raise UserError("--prompt and --messages: give one of them")
        models.check_messages(messages, "--messages")
        return {"messages": messages}
    if prompt is None or not prompt.strip():
        raise UserError("--prompt: empty; give the text to explain (or --messages JSON)")
    return {"text": prompt} if completion else {"prompt": prompt}


LOG_PROB = "log p(output token | prompt, earlier output tokens), teacher-forced"
LOG_ODDS = "log odds logit(p(output token | prompt, earlier output tokens)), teacher-forced (shap's TeacherForcing)"


def explain_ids(model, tok, prompt: list[int], target: list[int], method: str, *, n_steps: int, samples: int,
                baseline: str, evals: int = 500, features: list[dict] | None = None) -> dict:
    """The attribution result for prompt and target ids already checked (see run_explain).
    `features`: spans located by spans.features (a perturbation method's features), else tokens."""
    if features is not None and method not in SPAN_METHODS:
        raise UserError(f"spans: method {method} attributes to tokens only; spans need one of {', '.join(SPAN_METHODS)}")
    base = baseline_id(tok, baseline)
    start = time.perf_counter()
    deltas, extra = None, {}
    if method == "integrated_gradients":
        matrix, deltas = attribute.integrated_gradients(model, prompt, target, n_steps, base)
        params = {"n_steps": n_steps, "baseline": f"{baseline} token embedding", "layer": "input embeddings"}
    elif method == "shap":
        matrix, base_values = textshap.shap_values(model, tok, prompt, target, base, evals)
        params = {"evals": evals, "baseline": f"{baseline} token", "algorithm": "partition", "masker": "Text"}
        extra = {"base_values": base_values}
    else:
        groups = None if features is None else [f["tokens"] for f in features]
        matrix = attribute.perturbation(model, tok, prompt, target, method, base, samples=samples, groups=groups)
        params = {"baseline": f"{baseline} token"} | ({"samples": samples} if method == "shapley_sampling" else {})
    seconds = time.perf_counter() - start
    width = len(prompt) if features is None else len(features)
    out = {"method": method, "parameters": params, "target_log_prob": LOG_ODDS if method == "shap" else LOG_PROB,
           "input_tokens": pieces(tok, prompt), "output_tokens": pieces(tok, target), "input_ids": list(prompt),
           "output_ids": list(target), "attributions": matrix,
           "input_totals": [sum(row[i] for row in matrix) for i in range(width)], "seconds": seconds, **extra}
    if features is not None:  # the attribution columns are these spans, not the tokens
        params["features"] = "spans"
        out["input_spans"] = features
    if deltas is not None:
        out["convergence_deltas"] = deltas
    return out


def spans_of(tok, ids: list[int], text: str, given: list | None, granularity: str) -> list[dict] | None:
    """The located spans (`--spans` or `--granularity sentence`), or None for tokens."""
    try:
        return spans.features(tok, ids, text, given, granularity, "--spans")
    except UserError as e:
        if given is None:  # sentences found nothing: the flag to change is --granularity
            raise UserError(str(e).replace("--spans", "--granularity", 1)) from None
        raise


def run_explain(cfg: RaylabConfig, model_ref: str, prompt: str | None = None, target: str | None = None,
                method: str | None = None, *, messages: list | None = None, completion: bool = False,
                n_steps: int | None = None, samples: int | None = None, evals: int | None = None,
                spans: list | None = None, granularity: str = "token", html: str | None = None,
                store: registry.Store | None = None) -> dict:
    """Token attributions of `model_ref`'s answer to `prompt` (or chat `messages`); returns
    {method, parameters, input_tokens, output_tokens, attributions [output x input],
    input_totals, seconds, convergence_deltas (integrated gradients), model, target_source}.
    With `spans` ([start, end] character offsets into the prompt, or a chat's last message) or
    `granularity="sentence"`, a perturbation method's inputs are those spans (`input_spans`)."""
    ex = cfg.explain
    method = method or ex.method
    if method not in EXPLAIN_METHODS:
        raise UserError(f"--method {method!r}: unknown; choose one of {', '.join(EXPLAIN_METHODS)}")
    if (spans is not None or granularity != "token") and method not in SPAN_METHODS:
        raise UserError(f"--spans/--granularity: method {method} attributes to tokens only; spans need one of "
                        f"{', '.join(SPAN_METHODS)}")
    for flag, value in (("--n-steps", n_steps), ("--samples", samples), ("--evals", evals)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    item = prompt_item(prompt, messages, completion)
    if target is not None and not target.strip():
        raise UserError("--target: empty; leave it out to explain the model's own greedy answer")
    # a missing extra fails before minutes of loading
    textshap.shap_module() if method == "shap" else attribute.captum_attr()
    inf = models.load(model_ref, dtype="float32", store=store)
    tok = inf.tokenizer
    ids = models.prompt_ids(tok, item, "--messages")
    if len(ids) > ex.max_prompt_tokens:
        raise UserError(f"explain.max_prompt_tokens: the prompt is {len(ids)} tokens, over the limit "
                        f"{ex.max_prompt_tokens}; shorten it or raise the limit")
    if target is not None:
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
        if len(target_ids) > ex.max_target_tokens:
            raise UserError(f"explain.max_target_tokens: --target is {len(target_ids)} tokens, over the limit "
                            f"{ex.max_target_tokens}; shorten it or raise the limit")
    else:
        target_ids = models.greedy_ids(inf.model, tok, [ids], ex.max_target_tokens)[0]
        if not target_ids:
            raise UserError(f"--target: {model_ref}'s greedy answer is empty (it ends the turn at once); "
                            "give --target TEXT to explain")
    text = item["messages"][-1]["content"] if messages is not None else prompt
    found = spans_of(tok, ids, text, spans, granularity)
    result = explain_ids(inf.model, tok, ids, target_ids, method, n_steps=n_steps or ex.n_steps,
                         samples=samples or ex.samples, baseline=ex.baseline, evals=evals or ex.evals, features=found)
    result |= {"model": inf.ref or model_ref, "target_source": "given" if target is not None else "greedy answer",
               "output_text": tok.decode(target_ids, skip_special_tokens=True)}
    log.info(f"explain: {method} over {len(ids)} prompt x {len(target_ids)} output tokens of {result['model']} "
             f"in {result['seconds']:.2f} s")
    if html:
        storage.write_text(html, render.html(result))
        result["html"] = html
    return result
