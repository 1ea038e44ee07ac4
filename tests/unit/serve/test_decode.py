"""The serving decode loop (raylab/serve/decode.py) on a tiny random Llama and GPT-2: greedy rows
equal `model.generate`; a batch equals each sequence alone; sequences that join a running
batch mid-way (continuous batching) and rows that leave it get the same logits as alone;
stop strings, max_tokens, end of turn, seeds, presence and frequency penalties; peft adapters
side by side in one batch."""

from __future__ import annotations

import copy

import pytest
import torch

from raylab import models as model
from raylab.models import left_pad
from raylab.serve import decode as decoding
from raylab.serve.decode import Batch, Sampling, Sequence, decode


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def lm(request):
    tok = model.build_byte_tokenizer()
    tok.chat_template = model.DEFAULT_CHAT_TEMPLATE
    return model.build_tiny_model(request.param, tok, seed=1).eval(), tok


PROMPTS = ["hello world", "a much longer prompt, to make the padding differ", "x", "widgets ship today"]


def ids(tok, text):
    return tok(text)["input_ids"]


def greedy(n):
    return Sampling(max_tokens=n, temperature=0, ignore_eos=True)


def recording(monkeypatch):
    """Every row's logits, keyed by its Sequence, as the loop chooses tokens."""
    seen = {}
    choose = decoding._choose

    def spy(logits, seqs, generators):
        for row, s in zip(logits, seqs, strict=True):
            if not s.done:
                seen.setdefault(id(s), []).append(row.clone())
        return choose(logits, seqs, generators)

    monkeypatch.setattr(decoding, "_choose", spy)
    return seen


def alone(lm, prompt, n):
    s = Sequence(prompt, greedy(n))
    for _ in decode(*lm, [s], stop_ids=set()):
        pass
    return s


def test_greedy_equals_generate_and_batch_equals_alone(lm):
    m, tok = lm
    prompts = [ids(tok, p) for p in PROMPTS]
    x, mask = left_pad(prompts, tok.pad_token_id)
    with torch.inference_mode():
        ref = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)[:, x.shape[1]:]
    seqs = [Sequence(p, greedy(12)) for p in prompts]
    for _ in decode(m, tok, seqs, stop_ids=set()):
        pass
    assert [s.token_ids for s in seqs] == ref.tolist()
    assert [alone(lm, p, 12).token_ids for p in prompts] == ref.tolist()


def test_joining_and_leaving_a_running_batch_changes_no_logits(lm, monkeypatch):
    m, tok = lm
    prompts = [ids(tok, p) for p in PROMPTS]
    lengths = [10, 4, 12, 7]
    seen = recording(monkeypatch)
    solo = [alone(lm, p, n) for p, n in zip(prompts, lengths, strict=True)]
    solo_logits = [seen.pop(id(s)) for s in solo]
    batch = Batch(m, tok, stop_ids=set())
    joined = [Sequence(p, greedy(n)) for p, n in zip(prompts, lengths, strict=True)]
    batch.advance(joined[:1])                 # one running ...
    batch.advance()
    batch.advance(joined[1:3])                # ... two join at step 2 (longer and shorter prompts) ...
    for _ in range(3):
        batch.advance()                       # ... the 4-token one finishes and leaves ...
    batch.advance(joined[3:])                 # ... the last joins after that
    while batch.seqs:
        batch.advance()
    for s, ref, ref_logits in zip(joined, solo, solo_logits, strict=True):
        assert s.token_ids == ref.token_ids and s.finish_reason == "length"
        got = seen[id(s)]
        assert len(got) == len(ref_logits)
        assert max(float((a - b).abs().max()) for a, b in zip(got, ref_logits, strict=True)) < 1e-4


def test_stops_max_tokens_end_of_turn_and_seeds(lm):
    m, tok = lm
    p = ids(tok, PROMPTS[0])
    free = alone(lm, p, 10)
    text = tok.decode(free.token_ids, skip_special_tokens=True)
    stop = text[3:5]
    s = Sequence(p, Sampling(max_tokens=10, temperature=0, stop=(stop,), ignore_eos=True))
    streamed = "".join("".join(d) for d in decode(m, tok, [s], stop_ids=set()))
    assert s.finish_reason == "stop" and s.text == streamed == text[:text.find(stop)]
    eot = free.token_ids[2]  # pretend the third token is the end of turn
    s = Sequence(p, Sampling(max_tokens=10, temperature=0))
    for _ in decode(m, tok, [s], stop_ids={eot}):
        pass
    assert s.finish_reason == "stop" and s.token_ids == free.token_ids[:free.token_ids.index(eot)]
    draws = []
    for seed in (7, 7, 8):
        s = Sequence(p, Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed))
        for _ in decode(m, tok, [s], stop_ids=set()):
            pass
        draws.append(s.token_ids)
    assert draws[0] == draws[1] and draws[0] != draws[2]


def penalised_greedy(m, prompt, n, presence, frequency):
    """The reference: a full forward per token, OpenAI's penalties applied by hand."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = m(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            out.append(int(logits.argmax()))
    return out


def test_presence_and_frequency_penalties_follow_openais_definition(lm):
    m, tok = lm
    p, q, n = ids(tok, PROMPTS[0]), ids(tok, PROMPTS[3]), 16
    plain = alone(lm, p, n).token_ids
    want = penalised_greedy(m, p, n, 0.5, 1.5)
    assert want != plain  # the control: these penalties change this model's greedy text
    assert penalised_greedy(m, p, n, 0.0, 0.0) == plain  # and the reference without them is greedy
    s = Sequence(p, Sampling(max_tokens=n, temperature=0, ignore_eos=True, presence_penalty=0.5, frequency_penalty=1.5))
    other = Sequence(q, greedy(n))  # an unpenalised row beside it keeps its own greedy text
    for _ in decode(m, tok, [s, other], stop_ids=set()):
        pass
    assert s.token_ids == want and other.token_ids == alone(lm, q, n).token_ids
    # negative penalties favour repeats: the most repeated token gains
    s = Sequence(p, Sampling(max_tokens=n, temperature=0, ignore_eos=True, frequency_penalty=-2.0))
    for _ in decode(m, tok, [s], stop_ids=set()):
        pass
    assert s.token_ids == penalised_greedy(m, p, n, 0.0, -2.0)
    assert max(map(s.token_ids.count, s.token_ids)) >= max(map(plain.count, plain))


def test_two_adapters_and_the_base_in_one_batch():
    from peft import LoraConfig, PeftModel, get_peft_model

    tok = model.build_byte_tokenizer()
    base = model.build_tiny_model("tiny-llama", tok, seed=2).eval()
    wrapped = None
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        trained = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        if wrapped is None:
            wrapped = PeftModel(copy.deepcopy(base), trained.peft_config["default"], adapter_name=name)
        else:
            wrapped.add_adapter(name, trained.peft_config["default"])
        wrapped.load_state_dict({k.replace(".default.", f".{name}."): v for k, v in trained.state_dict().items()
                                 if "lora_" in k}, strict=False)
    wrapped.eval()
    p = ids(tok, PROMPTS[3])
    rows = [Sequence(p, greedy(8), adapter=a) for a in ("a", "b", None)]
    for _ in decode(wrapped, tok, rows, stop_ids=set()):
        pass
    for s, a in zip(rows, ("a", "b", None), strict=True):
        only = Sequence(p, greedy(8), adapter=a)
        for _ in decode(wrapped, tok, [only], stop_ids=set()):
            pass
        assert s.token_ids == only.token_ids
    plain = Sequence(p, greedy(8))
    for _ in decode(base, tok, [plain], stop_ids=set()):
        pass
    assert rows[2].token_ids == plain.token_ids and rows[0].token_ids != rows[1].token_ids


def test_a_prefill_computes_the_last_positions_logits_only(lm):
    """logits_to_keep=1 at prefill: the LM head sees one position per row, not the prompt's
    every position (the control: a plain forward of the same prompt computes all of them);
    greedy output is unchanged (the tests above)."""
    m, tok = lm
    head = m.get_output_embeddings()
    widths = []
    hook = head.register_forward_hook(lambda _module, _args, out: widths.append(out.shape[1]))
    try:
        prompt = ids(tok, PROMPTS[1])
        for _ in decode(m, tok, [Sequence(prompt, greedy(2))], stop_ids=set()):
            pass
        assert widths == [1, 1]  # the prefill, then one decode step
        with torch.inference_mode():
            m(input_ids=torch.tensor([prompt]))
        assert widths[-1] == len(prompt) > 1
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def tokenizers():
    """The byte tokenizer (multi-byte characters split across tokens) and a trained BPE one."""
    texts = ["widgets ship today, Grüße aus Köln", "naïve café déjà vu — ok", "日本語のテキストです", "hello world"] * 8
    return [model.build_byte_tokenizer(), model.train_corpus_tokenizer(texts, vocab_size=300, min_frequency=1)]


@pytest.mark.parametrize("text", ["widgets ship today", "Grüße aus Köln — naïve café", "日本語のテキスト and ascii",
                                  "a  b   c\n\nd", "€€€"])
def test_incremental_detokenization_equals_decoding_everything(tokenizers, text):
    """decode._decoded, fed one token at a time, ends with tok.decode of them all, and never
    shows a broken character mid-way that the full text does not have."""
    for tok in tokenizers:
        token_ids = tok(text, add_special_tokens=False)["input_ids"]
        s = Sequence([], greedy(len(token_ids)))
        for t in token_ids:
            s.token_ids.append(t)
            shown = decoding._decoded(tok, s).rstrip("\ufffd")
            assert tok.decode(s.token_ids, skip_special_tokens=True).startswith(shown)
        assert decoding._decoded(tok, s) == tok.decode(token_ids, skip_special_tokens=True) == text


def test_a_final_only_sequence_decodes_its_text_once_at_the_end(lm, monkeypatch):
    """Sampling.final_only (a request without streaming): no text decoded per step, the same
    text at the end as the streamed sequence's; the control, a streamed sequence, decodes every
    step. With stop strings the text is still decoded each step (the stops need it)."""
    m, tok = lm
    calls = []
    real = type(tok).decode
    monkeypatch.setattr(type(tok), "decode", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    prompt = ids(tok, PROMPTS[0])
    streamed, quiet = Sequence(prompt, greedy(12)), Sequence(prompt, Sampling(12, 0, ignore_eos=True, final_only=True))
    outs = {id(streamed): [], id(quiet): []}
    for s in (streamed, quiet):
        calls.clear()
        batch = Batch(m, tok, set())
        outs[id(s)] = [text for _ in range(12) for seq, text in batch.advance([s] if not batch.seqs else ())]
        outs[id(s)].append(len(calls))
    *pieces, streamed_calls = outs[id(streamed)]
    *quiet_pieces, quiet_calls = outs[id(quiet)]
    assert quiet.done and streamed.done and quiet.text == streamed.text == "".join(pieces)
    assert quiet_pieces[:-1] == [""] * 11 and quiet_pieces[-1] == quiet.text
    assert quiet_calls == 1 and streamed_calls >= 12  # the control: decoded every step
    stop = streamed.text[3:5]
    stopped = Sequence(prompt, Sampling(12, 0, stop=(stop,), ignore_eos=True, final_only=True))
    for _ in decode(m, tok, [stopped], stop_ids=set()):
        pass
    assert stopped.finish_reason == "stop" and stopped.text == streamed.text[:streamed.text.index(stop)]
