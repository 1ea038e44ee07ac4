"""Token generation for serving: one KV-cache decode loop over a batch of sequences, each with
its own sampling settings, stop strings and LoRA adapter, yielding text as it is produced.

    seqs = [Sequence(prompt_ids(tok, {"prompt": "hi"}), Sampling(max_tokens=32))]
    for deltas in decode(model, tok, seqs):
        print(deltas)          # one new piece of text (maybe "") per sequence, every step

Why not `model.generate`: a served batch mixes requests with different temperatures, top_p,
seeds, max_tokens, stop strings and adapters, and streams every token; `generate` takes
one setting for the whole batch and returns at the end. Greedy rows pick the argmax exactly
as `generate` does (left padding, positions from the attention mask), so served greedy text
equals offline generation (tests/test_serve.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's extension


@dataclass
class Sequence:
    """One choice being generated."""

    prompt: list[int]
    sampling: Sampling
    adapter: str | None = None  # peft adapter name when the model serves several
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    finish_reason: str | None = None  # "stop" | "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def eos_ids(model, tok) -> set[int]:
    found = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return found


def decode(model, tok, seqs: list[Sequence], stop_ids: set[int] | None = None) -> Iterator[list[str]]:
    """Generate for every sequence together; after each step yield each one's new text."""
    import torch

    from raylab.generate import left_pad

    stop_ids = eos_ids(model, tok) if stop_ids is None else stop_ids
    generators = [_generator(s.sampling.seed) for s in seqs]
    ids, mask = left_pad([s.prompt for s in seqs], tok.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # A peft model always gets names per row: without them it applies its active adapter to all.
    extra = {"adapter_names": [s.adapter or BASE_ADAPTER for s in seqs]} if hasattr(model, "peft_config") else {}
    past = None
    while True:
        # inference_mode per step, not around the loop: a served decode runs each step in
        # whichever executor thread is free, and the mode is thread-local.
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, **extra)
            past = out.past_key_values
            chosen = _choose(out.logits[:, -1, :].float(), seqs, generators)
            deltas = [_advance(tok, s, int(t), stop_ids) for s, t in zip(seqs, chosen.tolist(), strict=False)]
            # Finished rows keep stepping (on pad) so the batch stays rectangular; their
            # output is ignored. Pruning them from the cache would save work on long tails.
            ids = chosen.where(torch.tensor([not s.done for s in seqs]), tok.pad_token_id).unsqueeze(-1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
            positions = positions[:, -1:] + 1
        yield deltas
        if all(s.done for s in seqs):
            return


def _generator(seed: int | None):
    import torch

    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _choose(logits, seqs: list[Sequence], generators) -> torch.Tensor:  # noqa: F821
    """Next token per row: argmax for greedy rows, else temperature + nucleus sampling."""
    import torch

    chosen = logits.argmax(dim=-1)
    for i, s in enumerate(seqs):
        if s.done or s.sampling.temperature == 0:
            continue
        probs = torch.softmax(logits[i] / s.sampling.temperature, dim=-1)
        if s.sampling.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.sampling.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen


def _advance(tok, s: Sequence, token: int, stop_ids: set[int]) -> str:
    """Take one token into a sequence; return the text it makes visible."""
    if s.done:
        return ""
    if token in stop_ids and not s.sampling.ignore_eos:
        s.finish_reason = "stop"
        return _emit(s, tok.decode(s.token_ids, skip_special_tokens=True), final=True)
    s.token_ids.append(token)
    full = tok.decode(s.token_ids, skip_special_tokens=True)
    for stop in s.sampling.stop:
        at = full.find(stop, max(0, len(s.text) - len(stop)))
        if at >= 0:
            s.finish_reason = "stop"
            return _emit(s, full[:at], final=True)
    if len(s.token_ids) >= s.sampling.max_tokens:
        s.finish_reason = "length"
        return _emit(s, full, final=True)
    return _emit(s, full, final=False)


def _emit(s: Sequence, full: str, final: bool) -> str:
    """The new visible text. Until the end, hold back an unfinished UTF-8 character and any
    tail that may be the start of a stop string, so a client never sees part of a stop."""
    visible = full
    if not final:
        visible = visible.rstrip("\ufffd")
        for stop in s.sampling.stop:
            for k in range(min(len(stop) - 1, len(visible)), 0, -1):
                if visible.endswith(stop[:k]):
                    visible = visible[:-k]
                    break
    if not visible.startswith(s.text):  # a held-back character decoded differently: resend nothing twice
        return ""
    delta = visible[len(s.text):]
    s.text = visible
    return delta
