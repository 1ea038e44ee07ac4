"""Prompt rendering and decoding shared by eval, gates and serving (no Ray): a prompt is
rendered exactly as training rendered the conversation up to the answer, left padding
keeps each row's tokens, and a padded batch gives each prompt the logits it has alone."""

from __future__ import annotations

import pytest

from raylab import models as generate
from raylab.config import ModelConfig
from raylab.data import packing
from raylab.errors import UserError
from raylab.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="preset:tiny-llama"))


def test_prompt_is_the_training_encoding_up_to_the_answer(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When does it ship?"},
                {"role": "assistant", "content": "Today."}]
    trained, labels = packing.encode_chat(tok, messages, train_on_prompt=False)
    prompt = generate.prompt_ids(tok, {"messages": messages[:2]})
    answer_starts = next(i for i, label in enumerate(labels) if label != packing.IGNORE)
    assert prompt == trained[:answer_starts]  # the model continues where training taught it to answer
    assert generate.prompt_ids(tok, {"prompt": "When does it ship?"}) == generate.prompt_ids(
        tok, {"messages": [{"role": "user", "content": "When does it ship?"}]})
    assert generate.prompt_ids(tok, {"text": "plain"}) == tok("plain", add_special_tokens=True)["input_ids"]


@pytest.mark.parametrize(("item", "message"), [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, r"messages\[0\] must be"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] must be"),
    ({"nothing": 1}, "expected a 'messages' list"),
])
def test_bad_prompts_name_the_problem(tok, item, message):
    with pytest.raises(UserError, match=message):
        generate.prompt_ids(tok, item)


def test_left_padding_keeps_each_row(tok):
    ids, mask = generate.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_padded_batch_gives_each_prompt_its_own_logits(tiny_model_dir):
    """The next-token logits of a left-padded row equal the prompt's alone (logits, not
    greedy text: a random-weight model sits on near-ties that float noise can flip)."""
    import torch

    model, tok = generate.load_inference(str(tiny_model_dir))
    prompts = [generate.prompt_ids(tok, {"prompt": p}) for p in ("Hi", "A much longer question about widgets?")]
    ids, mask = generate.left_pad(prompts, tok.pad_token_id)
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        together = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        for i, p in enumerate(prompts):
            alone = model(input_ids=torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(together[i], alone, atol=1e-4, rtol=1e-4)
    assert len(generate.greedy(model, tok, prompts, max_new_tokens=4)) == 2
