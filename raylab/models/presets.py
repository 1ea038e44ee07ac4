"""Tiny preset models for tests and the quickstart: a transformers config with seeded random
weights and a byte-level tokenizer, materialised once under `$RAYLAB_HOME/models/<preset>`
and then loaded like any local model, so a saved adapter's `base_model_name_or_path` points
at a path that outlives the process that made it.

    model.name_or_path: preset:tiny-llama        # in a config
    materialize_preset("tiny-llama")              # -> $RAYLAB_HOME/models/tiny-llama

With `pretrain.tokenizer` the preset is instead built against a BPE tokenizer trained on the
redacted corpus (`train_corpus_tokenizer`, by the data stage; `build_base`, by the pretrain
stage, into the run directory), so the stand-in base reads and writes word pieces, not bytes.

Every tokenizer raylab builds carries DEFAULT_CHAT_TEMPLATE (ChatML-style, assistant turns
wrapped in `{% generation %}` so the data stage can mask everything but the answers).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raylab.core import runs, storage
from raylab.errors import UserError

PRESET_VERSION = 1  # bump when a preset's architecture or tokenizer changes

# Turn ends with the tokenizer's eos token, so generation stops where training taught it to.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|im_end|>"}
EXTRA_SPECIALS = ["<|im_start|>"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    # The quickstart's stand-in base (with pretrain.tokenizer): ~0.6 M parameters besides the
    # embeddings, as much compute per 160-token row as tiny-llama per 512 bytes, and enough
    # width to write the corpus's sentences back in words.
    "mini-llama": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) with the default chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + EXTRA_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS, additional_special_tokens=EXTRA_SPECIALS)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def train_corpus_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library, with the
    same special tokens and chat template as the byte tokenizer (so it drops into every stage
    unchanged), as a transformers fast tokenizer: `save_pretrained` it and `from_pretrained`
    loads it like any model's.

        tok = train_corpus_tokenizer(redacted_texts, vocab_size=2048)   # the data stage does this

    Byte-level, so any text still encodes (no unknown token) and decodes back exactly. The
    result depends only on the texts, their order and the settings: the caller passes them
    in a fixed order (the data stage sorts by record id), and the trainer breaks ties between
    equally frequent pairs by the pair itself, so the same corpus gives the same fingerprint.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + EXTRA_SPECIALS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's word split, then bytes
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS, additional_special_tokens=EXTRA_SPECIALS)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def build_base(preset: str, tokenizer_dir: str, target: str) -> str:
    """A preset's random-weight model sized for the tokenizer saved at `tokenizer_dir`, saved
    with that tokenizer at `target` (the pretrain stage's starting point when the tokenizer was
    trained on the corpus). Skipped when `target` already holds it for the same tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar in the pretrain stage's console is noise
    if preset not in PRESETS:
        raise UserError(f"model.name_or_path: unknown preset {preset!r}; expected one of: {', '.join('preset:' + p for p in PRESETS)}")
    with storage.plain_dir(tokenizer_dir) as src:
        tok = AutoTokenizer.from_pretrained(src)
    stamp = json.dumps({"preset": preset, "version": PRESET_VERSION, "vocab": _sha(json.dumps(sorted(tok.get_vocab().items()))),
                        "template": _sha(tok.chat_template or "")})
    marker = runs.model_file(target, runs.PRESET_MARKER)
    if storage.exists(marker) and storage.read_text(marker) == stamp:
        return target
    with tempfile.TemporaryDirectory(prefix="raylab-base-") as staging:
        storage.save_pretrained(tok, staging)
        storage.save_pretrained(build_tiny_model(preset, tok), staging)
        storage.copy_dir(staging, target)
    storage.write_text(marker, stamp)  # last: a copy cut short is rebuilt next time
    return target


def build_tiny_model(preset: str, tokenizer, seed: int = 0):
    """A randomly initialised causal LM from a preset's config (seeded, so reproducible)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(PRESETS[preset])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def materialize_preset(name: str) -> Path:
    """Build preset `name` under $RAYLAB_HOME/models/<name> once; return its directory.

    Built in a temporary sibling and renamed into place, so concurrent callers (several
    workers on one node) never see a half-written directory.
    """
    if name not in PRESETS:
        raise UserError(f"model.name_or_path: unknown preset {name!r}; expected one of: {', '.join('preset:' + p for p in PRESETS)}")
    target = runs.home().preset(name)
    marker = target / runs.PRESET_MARKER
    stamp = {"preset": name, "version": PRESET_VERSION, "template": _sha(DEFAULT_CHAT_TEMPLATE)}
    if _current(marker, stamp):
        return target
    storage.makedirs(str(target.parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = build_byte_tokenizer()
        model = build_tiny_model(name, tok)
        storage.save_pretrained(tok, str(staging))
        storage.save_pretrained(model, str(staging))
        storage.write_text(str(staging / marker.name), json.dumps(stamp))
        # Another process may have finished while this one built: its copy is identical and
        # may be in use (a worker loading it), so it is kept, never replaced.
        if _current(marker, stamp):
            return target
        if target.exists():  # an older preset version, or a half-built one from a crash
            marker.unlink(missing_ok=True)  # first: a half-removed tree must never look complete
            storage.remove_local_tree(str(target))
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not marker.exists():
                raise
    finally:
        storage.remove_local_tree(str(staging))
    return target




def _current(marker: Path, stamp: dict) -> bool:
    """Whether a complete preset of this version is in place (its marker, written last)."""
    try:
        return json.loads(storage.read_text(str(marker))) == stamp
    except (FileNotFoundError, ValueError):  # none yet, or caught while it is written
        return False


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
