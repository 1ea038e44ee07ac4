"""A request's job (routers/inference.py builds it) as engine requests for one loaded version:
its prompts rendered with the version's own chat template (as in training; tools and tool
calls by the template where it takes them), one engine request per choice, and a 400 for
what the version's engine cannot do or the limits refuse.

    reqs, prompt_tokens = choices.requests(loaded, job, limits)
"""

from __future__ import annotations

import json
import uuid

from raylab import models
from raylab.errors import UserError
from raylab.serve import openai_api as oa
from raylab.serve import tools, vllm_engine
from raylab.serve.engine import Request, Sampling


def _prompts(loaded, job: dict) -> list[list[int]]:
    """Token ids per prompt, rendered with the version's own chat template (as in training)."""
    out = []
    for p in job["prompts"]:
        try:
            if job["chat"]:
                msgs = [m | {"role": "system" if m["role"] == "developer" else m["role"]} for m in p]
                if job.get("tools") or any(set(m) - {"role", "content"} for m in msgs):
                    # tools and tool calls: the template's own rendering of them (models.prompt_ids
                    # checks training's plain {role, content} messages)
                    out.append(list(loaded.tok.apply_chat_template(msgs, tools=job.get("tools"), tokenize=True,
                                                                   add_generation_prompt=True,
                                                                   return_dict=True)["input_ids"]))
                else:
                    out.append(models.prompt_ids(loaded.tok, {"messages": msgs}, "messages"))
            else:
                out.append(models.prompt_ids(loaded.tok, {"text": p}, "prompt"))
        except UserError as e:
            raise oa.ApiError(400, str(e), "messages" if job["chat"] else "prompt") from None
        except Exception as e:  # a template that refuses this conversation (jinja raise_exception)
            raise oa.ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    return out


def requests(loaded, job: dict, limits: dict) -> tuple[list[Request], int]:
    """The engine requests for a request's choices (prompts x n, in choice order) and its
    prompt tokens, or ApiError(400) for an over-long prompt."""
    prompts = _prompts(loaded, job)
    longest = max(len(p) for p in prompts)
    if longest > limits["max_prompt_tokens"]:
        raise oa.ApiError(400, f"the prompt has {longest} tokens; the limit is {limits['max_prompt_tokens']} "
                               "(serve.max_prompt_tokens)", "messages" if job["chat"] else "prompt", "context_length_exceeded")
    room = loaded.context - longest
    want = job["max_tokens"] or min(limits["max_tokens"], room)
    if want > room:
        raise oa.ApiError(400, f"the prompt ({longest} tokens) plus max_tokens ({want}) exceeds the model's context of "
                               f"{loaded.context} tokens", "max_tokens", "context_length_exceeded")
    s, rid = job["sampling"], uuid.uuid4().hex
    constraint = None if s["constraint"] is None else json.dumps(s["constraint"])
    call = job.get("tool_call")
    auto = call is not None and "parser" in call
    if not isinstance(loaded.engine, vllm_engine.VllmEngine):
        for name, asked in ((job["constraint_param"], constraint is not None),
                            ("logprobs", s["logprobs"] is not None), ("tool_choice", auto)):
            if asked:
                raise oa.ApiError(400, f"{name} needs the vLLM engine; {loaded.version} is served by the transformers "
                                       "engine, which does not serve it (its load is logged with why; README: the "
                                       "method x engine matrix)", name, "unsupported_parameter")
    keep = auto and tools.keeps_special_tokens(call, loaded.tok, job.get("tools"))
    out = []
    for p in prompts:
        for j in range(job["n"]):
            seed = None if s["seed"] is None else s["seed"] + j
            out.append(Request(f"{rid}-{len(out)}", p,
                               Sampling(want, s["temperature"], s["top_p"], tuple(s["stop"]), seed, s["ignore_eos"],
                                        s["presence_penalty"], s["frequency_penalty"], constraint, s["logprobs"],
                                        final_only=not job["stream"], keep_special_tokens=keep),
                               adapter=loaded.adapter))
    return out, sum(len(p) for p in prompts)
