"""Token generation for serving: a KV-cache decode loop over a batch of sequences, each with
its own sampling settings, seed, stop strings and LoRA adapter, producing text token by
token; sequences join the running batch between steps and leave it when they finish
(continuous batching).

    seqs = [Sequence(prompt_ids(tok, {"prompt": "hi"}), Sampling(max_tokens=32))]
    for deltas in decode(model, tok, seqs):
        print(deltas)          # one new piece of text (maybe "") per sequence, every step
    batch = Batch(model, tok); batch.advance(seqs); batch.advance(more_seqs); ...

Why not `model.generate`: a served batch mixes requests with different temperatures, top_p,
seeds, max_tokens, stop strings and adapters, and streams every token; `generate` takes
one setting for the whole batch and returns at the end. Greedy rows pick the argmax exactly
as `generate` does (left padding, positions from the attention mask), so served greedy text
equals offline generation (tests/unit/serve/test_decode.py and tests/integration/test_serve.py
check it). engine.TransformersEngine drives a Batch behind the serving engine interface.
"""

from __future__ import annotations

import functools
import inspect
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
    # OpenAI's penalties, as vLLM applies them: a token's logit loses presence_penalty once it
    # has been generated and frequency_penalty per time, counted over this choice's output only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # constrained output (OpenAI's response_format) as JSON text: {"json": schema} or
    # {"json_object": true}. Only the vLLM engine decodes under it (its structured outputs);
    # the transformers engine refuses a request that has one (engine.RequestRejected).
    constraint: str | None = None
    # OpenAI's chat logprobs: None = none; k = each generated token's logprob and its k most
    # likely alternatives. The vLLM engine's; the transformers engine refuses a request with them.
    logprobs: int | None = None
    # the caller wants the whole text at the end only (a request without streaming): without
    # stop strings to look for, the transformers engine decodes no text until the sequence ends
    # (vLLM's RequestOutputKind.FINAL_ONLY; the vLLM engine streams its deltas regardless)
    final_only: bool = False
    # keep special tokens in the text (the vLLM engine's; for tool_choice auto where the
    # family's call markers are special tokens, which its parser must see)
    keep_special_tokens: bool = False

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Sequence:
    """One choice being generated."""

    prompt: list[int]
    sampling: Sampling
    adapter: str | None = None  # peft adapter name when the model serves several
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    finish_reason: str | None = None  # "stop" | "length"
    # incremental detokenization (_decoded): the text of token_ids[:read], and where the window
    # decoded each step starts (the token before the new ones, for its spacing context)
    decoded: str = ""
    prefix: int = 0
    read: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def eos_ids(model, tok) -> set[int]:
    found = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return found


class Batch:
    """Sequences decoding together, which new sequences can join between steps (continuous
    batching): a newcomer is prefilled on its own, then its KV cache is left-padded to the
    running one's length and stacked onto it; finished rows leave the cache at once.

        batch = Batch(model, tok)
        batch.advance(new_sequences)   # -> [(sequence, new text), ...] for every running row
    """

    def __init__(self, model, tok, stop_ids: set[int] | None = None):
        self.model, self.tok = model, tok
        self.stop_ids = eos_ids(model, tok) if stop_ids is None else stop_ids
        self.peft = hasattr(model, "peft_config")  # always name adapters: else peft applies its active one to all
        self.seqs: list[Sequence] = []
        self.generators: list = []
        self.past = self.mask = self.positions = self.next_ids = None

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes transformers' `logits_to_keep` (its causal LMs do)."""
        base = self.model.get_base_model() if self.peft else self.model
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters

    @property
    def can_join(self) -> bool:
        """Whether newcomers can join now (only plain per-layer caches can be padded and stacked)."""
        if self.past is None:
            return True
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(self.past, "layers", [None]))

    def advance(self, new: list[Sequence] = ()) -> list[tuple[Sequence, str]]:
        """One token for every running sequence, and the first for each newcomer."""
        import torch

        out: list[tuple[Sequence, str]] = []
        with torch.inference_mode():  # per call: a server runs calls in whichever thread is free
            if self.seqs:
                logits, self.past = self._forward(self.next_ids, self.mask, self.positions, self.past, self.seqs)
                chosen, taken = self._take(logits, self.seqs, self.generators)
                out += taken
                self.next_ids, self.mask, self.positions = self._next(self.seqs, chosen, self.mask, self.positions)
            if new:
                out += self._join(list(new))
            self._prune()
        return out

    def _forward(self, ids, mask, positions, past, seqs):
        extra = {"adapter_names": [s.adapter or BASE_ADAPTER for s in seqs]} if self.peft else {}
        if past is None and self._keeps_logits:
            # a prefill needs the last position's logits only: the LM head over every prompt
            # position costs prompt length x vocabulary (128k for Llama 3) for nothing
            extra["logits_to_keep"] = 1
        result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                            use_cache=True, **extra)
        return result.logits[:, -1, :].float(), result.past_key_values

    def _take(self, logits, seqs, generators):
        """(chosen token ids, [(sequence, new text)]) for one step of these rows."""
        chosen = _choose(logits, seqs, generators)
        return chosen, [(s, _advance(self.tok, s, int(t), self.stop_ids)) for s, t in zip(seqs, chosen.tolist(), strict=True)]

    def _next(self, seqs, chosen, mask, positions):
        """Inputs of the next step: each row's chosen token (pad once finished)."""
        import torch

        running = torch.tensor([not s.done for s in seqs], device=chosen.device)
        ids = chosen.where(running, self.tok.pad_token_id).unsqueeze(-1)
        return ids, torch.cat([mask, torch.ones_like(ids)], dim=-1), positions[:, -1:] + 1

    def _join(self, new: list[Sequence]) -> list[tuple[Sequence, str]]:
        from raylab.models import left_pad

        generators = [_generator(s.sampling.seed) for s in new]
        ids, mask = left_pad([s.prompt for s in new], self.tok.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, past = self._forward(ids, mask, positions, None, new)
        chosen, out = self._take(logits, new, generators)
        next_ids, mask, positions = self._next(new, chosen, mask, positions)
        if self.past is None:
            self.past, self.mask, self.positions, self.next_ids = past, mask, positions, next_ids
        else:
            self._stack(past, mask, positions, next_ids)
        self.seqs += new
        self.generators += generators
        return out

    def _stack(self, past, mask, positions, next_ids) -> None:
        import torch

        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        for mine, theirs in zip(self.past.layers, past.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width - 1, 2), _pad_left(theirs.keys, width - 1, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width - 1, 2), _pad_left(theirs.values, width - 1, 2)])
        self.positions = torch.cat([self.positions, positions])
        self.next_ids = torch.cat([self.next_ids, next_ids])

    def _prune(self) -> None:
        """Drop finished rows, then cache columns that no remaining row attends to."""
        import torch

        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if not keep:
            self.past = self.mask = self.positions = self.next_ids = None
            return
        index = torch.tensor(keep)
        self.past.batch_select_indices(index)
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        start = int(self.mask.any(dim=0).nonzero()[0])
        if start and self.can_join:
            self.mask = self.mask[:, start:]
            for layer in self.past.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _pad_left(t, width: int, dim: int):
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def decode(model, tok, seqs: list[Sequence], stop_ids: set[int] | None = None) -> Iterator[list[str]]:
    """Generate for every sequence together (no newcomers); after each step yield each one's
    new text, in the order given."""
    batch = Batch(model, tok, stop_ids)
    pending, position = list(seqs), {id(s): i for i, s in enumerate(seqs)}
    while pending or batch.seqs:
        deltas = [""] * len(seqs)
        for s, text in batch.advance(pending):
            deltas[position[id(s)]] = text
        pending = []
        yield deltas


def _generator(seed: int | None):
    import torch

    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _choose(logits, seqs: list[Sequence], generators) -> torch.Tensor:  # noqa: F821
    """Next token per row: argmax for greedy rows, else temperature + nucleus sampling, after
    each row's presence and frequency penalties."""
    import torch

    logits = _penalised(logits, seqs)
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


def _penalised(logits, seqs: list[Sequence]):
    """`logits` (a copy where any row has penalties) less each row's penalties on the tokens
    it has generated (OpenAI's definition, which vLLM implements)."""
    import torch

    rows = [i for i, s in enumerate(seqs) if s.sampling.penalised and s.token_ids and not s.done]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        sampling = seqs[i].sampling
        ids, counts = torch.tensor(seqs[i].token_ids, device=logits.device).unique(return_counts=True)
        logits[i, ids] -= sampling.frequency_penalty * counts.to(logits.dtype) + sampling.presence_penalty
    return logits


def _advance(tok, s: Sequence, token: int, stop_ids: set[int]) -> str:
    """Take one token into a sequence; return the text it makes visible."""
    if s.done:
        return ""
    if token in stop_ids and not s.sampling.ignore_eos:
        s.finish_reason = "stop"
        return _emit(s, tok.decode(s.token_ids, skip_special_tokens=True), final=True)
    s.token_ids.append(token)
    if s.sampling.final_only and not s.sampling.stop:
        if len(s.token_ids) < s.sampling.max_tokens:
            return ""
        s.finish_reason = "length"
        return _emit(s, tok.decode(s.token_ids, skip_special_tokens=True), final=True)
    full = _decoded(tok, s)
    for stop in s.sampling.stop:
        at = full.find(stop, max(0, len(s.text) - len(stop)))
        if at >= 0:
            s.finish_reason = "stop"
            return _emit(s, full[:at], final=True)
    if len(s.token_ids) >= s.sampling.max_tokens:
        s.finish_reason = "length"
        return _emit(s, full, final=True)
    return _emit(s, full, final=False)


def _decoded(tok, s: Sequence) -> str:
    """tok.decode(s.token_ids) without decoding them all each step (quadratic in the answer's
    length): only the window from the token before the last completed text, as vLLM's
    incremental detokenizer does. While the window ends in an unfinished UTF-8 character the
    offsets stay (the text returned ends in U+FFFD, which _emit holds back); if the window's
    text ever disagrees with its start's, the whole sequence is decoded once again."""
    before = tok.decode(s.token_ids[s.prefix:s.read], skip_special_tokens=True)
    window = tok.decode(s.token_ids[s.prefix:], skip_special_tokens=True)
    if not window.startswith(before):
        s.decoded = tok.decode(s.token_ids, skip_special_tokens=True)
        s.prefix = s.read = len(s.token_ids)
        return s.decoded
    if window.endswith("\ufffd"):
        return s.decoded + window[len(before):]
    s.decoded += window[len(before):]
    s.prefix, s.read = s.read, len(s.token_ids)
    return s.decoded


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
