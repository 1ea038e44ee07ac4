"""The serving engine seam (raylab/serve/engine.py) through its one implementation,
TransformersEngine, on a tiny random Llama: greedy text through `submit` equals
`model.generate`; requests submitted together and one joining a running batch all finish
with the tokens they get alone; `abort` (and closing the stream) stops a request mid-stream;
a peft adapter loaded into the engine decodes as the peft model does and is gone once
unloaded; `stats()` counts all of it."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from raylab import models as model
from raylab.models import left_pad
from raylab.serve.engine import ABORT, Engine, Request, Sampling, TransformersEngine

PROMPTS = ["hello world", "a much longer prompt, to make the padding differ", "x", "widgets ship today"]


@pytest.fixture(scope="module")
def lm():
    tok = model.build_byte_tokenizer()
    return model.build_tiny_model("tiny-llama", tok, seed=1).eval(), tok


def ids(tok, text):
    return tok(text)["input_ids"]


def greedy(n):
    return Sampling(max_tokens=n, temperature=0, ignore_eos=True)


def generate(m, tok, prompts, n):
    """Reference: transformers' own greedy generation, as token ids and text."""
    x, mask = left_pad(prompts, tok.pad_token_id)
    with torch.inference_mode():
        out = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)[:, x.shape[1]:]
    return [tok.decode(row, skip_special_tokens=True) for row in out.tolist()]


async def collect(engine: Engine, request: Request) -> tuple[str, list]:
    outs = [out async for out in engine.submit(request)]
    return "".join(o.text for o in outs), outs


def test_transformers_engine_implements_the_engine_interface(lm):
    engine = TransformersEngine(*lm)
    assert isinstance(engine, Engine)
    assert Engine.__abstractmethods__ == {"submit", "abort", "load_adapter", "unload_adapter", "stats"}
    with pytest.raises(TypeError):  # the interface alone cannot be instantiated
        Engine()


def test_greedy_through_the_engine_equals_generate_and_concurrent_requests_all_finish(lm):
    m, tok = lm
    prompts = [ids(tok, p) for p in PROMPTS]
    ref = generate(m, tok, prompts, 12)
    engine = TransformersEngine(m, tok, max_batch_size=8, batch_wait_s=0.01, stop_ids=set())

    async def main():
        return await asyncio.gather(*(collect(engine, Request(f"r{i}", p, greedy(12))) for i, p in enumerate(prompts)))

    got = asyncio.run(main())
    assert [text for text, _ in got] == ref
    for _, outs in got:  # each stream ends with exactly one finished output, carrying the count
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        assert outs[-1].finish_reason == "length" and outs[-1].num_tokens == 12
    stats = engine.stats()
    assert stats["submitted"] == stats["finished"] == 4 and stats["aborted"] == 0
    assert stats["running"] == stats["waiting"] == 0 and stats["tokens"] == 48
    assert 12 <= stats["steps"] < 4 * 12  # decoded together, not one after another


def _second_after_three_steps(engine, first, second) -> tuple[list, list[int]]:
    """Start a 20-token request, submit an 8-token one once 3 steps ran; (both texts, how
    many sequences were running at each poll while the second was in flight)."""
    running = []

    async def main():
        one = asyncio.create_task(collect(engine, Request("one", first, greedy(20))))
        while engine.stats()["steps"] < 3:
            await asyncio.sleep(0.001)
        two = asyncio.create_task(collect(engine, Request("two", second, greedy(8))))
        while not two.done():
            running.append(engine.stats()["running"])
            await asyncio.sleep(0.001)
        return [(await one)[0], (await two)[0]]

    return asyncio.run(main()), running


def test_a_request_joining_a_running_batch_and_max_batch_size(lm):
    m, tok = lm
    first, second = ids(tok, PROMPTS[0]), ids(tok, PROMPTS[1])
    alone = [generate(m, tok, [p], n)[0] for p, n in ((first, 20), (second, 8))]
    texts, widest = _second_after_three_steps(TransformersEngine(m, tok, max_batch_size=1, stop_ids=set()), first, second)
    assert texts == alone
    assert max(widest) == 1  # max_batch_size=1: the second waited for the first
    texts, seen = _second_after_three_steps(TransformersEngine(m, tok, max_batch_size=4, stop_ids=set()), first, second)
    assert texts == alone  # joined mid-way, same text as alone
    assert max(seen) == 2


def test_abort_stops_a_request_mid_stream(lm):
    m, tok = lm
    engine = TransformersEngine(m, tok, stop_ids=set())
    p = ids(tok, PROMPTS[3])

    async def main():
        async def abort_later():
            while engine.stats()["steps"] < 5:
                await asyncio.sleep(0.001)
            await engine.abort("long")

        stopper = asyncio.create_task(abort_later())
        _, outs = await collect(engine, Request("long", p, greedy(500)))
        await stopper
        await engine.abort("long")  # again, once it has ended: nothing happens
        _, control = await collect(engine, Request("control", p, greedy(30)))  # same engine, not aborted
        return outs, control

    outs, control = asyncio.run(main())
    assert outs[-1].finish_reason == ABORT and 0 < outs[-1].num_tokens < 500
    assert control[-1].finish_reason == "length" and control[-1].num_tokens == 30
    stats = engine.stats()
    assert stats["aborted"] == 1 and stats["finished"] == 1 and stats["submitted"] == 2
    assert stats["running"] == stats["waiting"] == 0


def test_closing_the_stream_aborts_the_request(lm):
    m, tok = lm
    engine = TransformersEngine(m, tok, stop_ids=set())

    async def main():
        stream = engine.submit(Request("gone", ids(tok, PROMPTS[0]), greedy(500)))
        await anext(stream)
        await stream.aclose()  # a client that went away
        for _ in range(1000):  # the row leaves the batch at the next step
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        return engine.stats()

    stats = asyncio.run(main())
    assert stats["aborted"] == 1 and stats["finished"] == 0 and stats["running"] == 0 and stats["tokens"] == 0


def test_an_adapter_loaded_into_the_engine_decodes_as_peft_and_unloads(lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    m, tok = lm
    torch.manual_seed(0)
    trained = get_peft_model(copy.deepcopy(m), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    p = ids(tok, PROMPTS[2])
    with_adapter, without = generate(trained.eval(), tok, [p], 10)[0], generate(m, tok, [p], 10)[0]
    assert with_adapter != without  # else the comparison below could not tell them apart
    engine = TransformersEngine(copy.deepcopy(m), tok, stop_ids=set())

    async def main():
        await engine.load_adapter("a", str(tmp_path / "adapter"))
        got = await asyncio.gather(collect(engine, Request("lora", p, greedy(10), adapter="a")),
                                   collect(engine, Request("plain", p, greedy(10))))
        listed = engine.stats()["adapters"]
        await engine.unload_adapter("a")
        with pytest.raises(ValueError, match="no adapter 'a'"):
            await collect(engine, Request("late", p, greedy(10), adapter="a"))
        return [text for text, _ in got], listed

    texts, listed = asyncio.run(main())
    assert texts == [with_adapter, without] and listed == ["a"]
    assert engine.stats()["adapters"] == []


def test_an_adapter_that_fails_to_load_leaves_the_engine_as_it_was(lm, tmp_path):
    """A broken adapter (its config says rank 4, its weights are rank 8: what a canary's bad
    candidate can be) fails to load, and leaves no layers behind: the loaded adapter still
    decodes as before, and a retry fails the same way instead of piling up adapters."""
    import json

    from peft import LoraConfig, get_peft_model

    m, tok = lm
    torch.manual_seed(0)
    trained = get_peft_model(copy.deepcopy(m), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    trained.save_pretrained(tmp_path / "good")
    trained.save_pretrained(tmp_path / "bad")
    conf = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(conf | {"r": 4}))
    p = ids(tok, PROMPTS[2])
    engine = TransformersEngine(copy.deepcopy(m), tok, stop_ids=set())

    async def main():
        await engine.load_adapter("good", str(tmp_path / "good"))
        before = await collect(engine, Request("before", p, greedy(10), adapter="good"))
        for attempt in ("bad1", "bad2"):
            with pytest.raises(RuntimeError, match="size mismatch"):
                await engine.load_adapter(attempt, str(tmp_path / "bad"))
        after = await collect(engine, Request("after", p, greedy(10), adapter="good"))
        return before[0], after[0]

    before, after = asyncio.run(main())
    assert before == after == generate(trained.eval(), tok, [p], 10)[0]
    assert set(engine.model.peft_config) == {"good"} and engine.stats()["adapters"] == ["good"]
    lora_keys = [k for k in engine.model.state_dict() if "lora_A" in k]
    assert lora_keys and all(".good." in k for k in lora_keys)  # no layers of the failed loads left


def test_a_request_that_generated_no_token_is_counted_without_an_error():
    # Ray's Counter refuses inc(0); a request ending with no token (EOS first, or its client
    # left) raised that ValueError in the stream's `finally` and became a 500.
    from ray.util.metrics import Counter

    from raylab.serve.generator import count_tokens

    counter = Counter("raylab_test_generated_tokens", description="test", tag_keys=("model",))
    count_tokens(counter, 0, "m/1")
    count_tokens(counter, 3, "m/1")
    with pytest.raises(ValueError):  # the negative control: the call it guards does raise
        counter.inc(0, tags={"model": "m/1"})


def test_a_constrained_request_is_refused_by_the_transformers_engine_and_by_the_generator(lm):
    """response_format and logprobs are vLLM's: the transformers engine refuses a constraint rather than
    decode as if there were none, and the Generator answers a 400 naming the engine before any
    engine sees it. The control: the same job without a constraint builds its requests."""
    from raylab.serve import openai_api as oa
    from raylab.serve.choices import requests
    from raylab.serve.engine import RequestRejected
    from raylab.serve.generator import Loaded

    m, tok = lm
    engine = TransformersEngine(m, tok)
    constrained = Sampling(max_tokens=4, temperature=0, constraint='{"json_object": true}')

    async def submit():
        return await collect(engine, Request("r1", ids(tok, "hi"), constrained))

    with pytest.raises(RequestRejected, match="needs the vLLM engine"):
        asyncio.run(submit())
    assert engine.stats()["submitted"] == 0

    loaded = Loaded("widgets/2", engine, tok, None, lambda _: None)
    limits = {"max_prompt_tokens": 64, "max_tokens": 8}
    job = {"chat": False, "prompts": ["hi"], "n": 2, "max_tokens": 4, "stream": False, "constraint_param": "response_format",
           "sampling": {"temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None, "ignore_eos": False,
                        "presence_penalty": 0.0, "frequency_penalty": 0.0, "constraint": {"json": {"type": "object"}},
                        "logprobs": None}}
    with pytest.raises(oa.ApiError) as e:
        requests(loaded, job, limits)
    assert (e.value.status, e.value.param, e.value.code) == (400, "response_format", "unsupported_parameter")
    assert "widgets/2 is served by the transformers engine" in e.value.message
    with pytest.raises(oa.ApiError) as e:  # logprobs likewise
        requests(loaded, {**job, "sampling": {**job["sampling"], "constraint": None, "logprobs": 2}}, limits)
    assert (e.value.status, e.value.param) == (400, "logprobs")
    with pytest.raises(RequestRejected, match="logprobs needs the vLLM engine"):
        asyncio.run(collect(engine, Request("r2", ids(tok, "hi"), Sampling(max_tokens=4, logprobs=0))))
    reqs, prompt_tokens = requests(loaded, {**job, "sampling": {**job["sampling"], "constraint": None}}, limits)
    assert len(reqs) == 2 and prompt_tokens == len(ids(tok, "hi")) and reqs[0].sampling.constraint is None
