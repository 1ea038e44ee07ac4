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
from raylab.config import EXPLAIN_METHODS, RaylabConfig
from raylab.core import storage
from raylab.errors import UserError
from raylab.explain import attribute, render

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


def explain_ids(model, tok, prompt: list[int], target: list[int], method: str, *, n_steps: int, samples: int,
                baseline: str) -> dict:
    """The attribution result for prompt and target ids already checked (see run_explain)."""
    base = baseline_id(tok, baseline)
    start = time.perf_counter()
    deltas = None
    if method == "integrated_gradients":
        matrix, deltas = attribute.integrated_gradients(model, prompt, target, n_steps, base)
        params = {"n_steps": n_steps, "baseline": f"{baseline} token embedding", "layer": "input embeddings"}
    else:
        matrix = attribute.perturbation(model, tok, prompt, target, method, base, samples=samples)
        params = {"baseline": f"{baseline} token"} | ({"samples": samples} if method == "shapley_sampling" else {})
    seconds = time.perf_counter() - start
    out = {"method": method, "parameters": params, "target_log_prob": "log p(output token | prompt, earlier output "
           "tokens), teacher-forced", "input_tokens": pieces(tok, prompt),
           "output_tokens": pieces(tok, target), "input_ids": list(prompt),
           "output_ids": list(target), "attributions": matrix,
           "input_totals": [sum(row[i] for row in matrix) for i in range(len(prompt))], "seconds": seconds}
    if deltas is not None:
        out["convergence_deltas"] = deltas
    return out


def run_explain(cfg: RaylabConfig, model_ref: str, prompt: str | None = None, target: str | None = None,
                method: str | None = None, *, messages: list | None = None, completion: bool = False,
                n_steps: int | None = None, samples: int | None = None, html: str | None = None,
                store: registry.Store | None = None) -> dict:
    """Token attributions of `model_ref`'s answer to `prompt` (or chat `messages`); returns
    {method, parameters, input_tokens, output_tokens, attributions [output x input],
    input_totals, seconds, convergence_deltas (integrated gradients), model, target_source}."""
    ex = cfg.explain
    method = method or ex.method
    if method not in EXPLAIN_METHODS:
        raise UserError(f"--method {method!r}: unknown; choose one of {', '.join(EXPLAIN_METHODS)}")
    for flag, value in (("--n-steps", n_steps), ("--samples", samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    item = prompt_item(prompt, messages, completion)
    if target is not None and not target.strip():
        raise UserError("--target: empty; leave it out to explain the model's own greedy answer")
    attribute.captum_attr()  # a missing extra fails before minutes of loading
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
    result = explain_ids(inf.model, tok, ids, target_ids, method, n_steps=n_steps or ex.n_steps,
                         samples=samples or ex.samples, baseline=ex.baseline)
    result |= {"model": inf.ref or model_ref, "target_source": "given" if target is not None else "greedy answer",
               "output_text": tok.decode(target_ids, skip_special_tokens=True)}
    log.info(f"explain: {method} over {len(ids)} prompt x {len(target_ids)} output tokens of {result['model']} "
             f"in {result['seconds']:.2f} s")
    if html:
        storage.write_text(html, render.html(result))
        result["html"] = html
    return result
