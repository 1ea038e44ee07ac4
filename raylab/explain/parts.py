"""Which part of a prompt each of its tokens belongs to: the system message, the context (earlier
turns of the conversation, and the documents of a retrieval prompt), the question (the last
user message) or the chat template around them (role markers, special tokens, the generation
prompt).

    labels = label(tok, {"messages": [...]}, ids)    # one of PARTS per token of ids, or None
    # ids: models.prompt_ids(tok, item), the prompt as training and serving render it

The rendered prompt is tokenized once more with character offsets (what apply_chat_template
does, plus the offsets), each message's content is found in the rendered text in order, and a
token takes the part most of its characters fall in. When the offsets' ids are not `ids` (a
tokenizer without offsets, or a template that renders content differently) the answer is None:
a wrong label would be worse than none.
"""

from __future__ import annotations

PARTS = ("system", "context", "question", "template")
CONTENT = PARTS[:3]  # what was asked; the template is the same scaffolding around every prompt
# raylab/rag/prompt.py's `render` puts the documents first and this line before the question
# (a test keeps the two in step); the explain stage may not import rag, a sibling stage.
RETRIEVAL_QUESTION = "\n\nQuestion: "


def messages_of(item: dict) -> list[dict] | None:
    """The chat messages of a prompt item (models.prompt_ids's shapes), None for plain text."""
    if "messages" in item:
        return [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in item["messages"]]
    if isinstance(item.get("prompt"), str):
        return [{"role": "user", "content": item["prompt"]}]
    return None


def content_parts(messages: list[dict]) -> list[tuple[str, str]]:
    """(part, text) for each message's content, in order; a retrieval prompt in the question
    turn splits into its documents (context) and the question after them."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    question = users[-1] if users else None
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "system":
            out.append(("system", m["content"]))
        elif i != question:
            out.append(("context", m["content"]))
        elif RETRIEVAL_QUESTION in m["content"]:
            docs, asked = m["content"].rsplit(RETRIEVAL_QUESTION, 1)
            out += [("context", docs + RETRIEVAL_QUESTION), ("question", asked)]
        else:
            out.append(("question", m["content"]))
    return out


def _char_parts(rendered: str, pieces: list[tuple[str, str]]) -> list[str] | None:
    chars = ["template"] * len(rendered)
    cursor = 0
    for part, text in pieces:
        if not text:
            continue
        at = rendered.find(text, cursor)
        if at < 0:
            return None
        chars[at:at + len(text)] = [part] * len(text)
        cursor = at + len(text)
    return chars


def _by_offsets(chars: list[str], offsets: list[tuple[int, int]]) -> list[str]:
    labels = []
    for start, end in offsets:
        inside = chars[start:end]
        # the part most of the token's characters are in; a token of no characters (a byte of a
        # multi-byte character shares its offsets) goes with the template only if it has none
        labels.append(max(PARTS, key=inside.count) if inside else "template")
    return labels


def label(tok, item: dict, ids: list[int]) -> list[str] | None:
    """The part (PARTS) of each token of `ids`, the prompt `item` rendered; plain text
    (`{"text": ...}`) is all question but its special tokens; None when the tokens cannot be
    mapped back to the prompt's text."""
    messages = messages_of(item)
    if messages is None:
        text = item.get("text", "")
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        chars = ["question"] * len(text)
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        chars = _char_parts(text, content_parts(messages))
    if chars is None or list(enc["input_ids"]) != list(ids) or "offset_mapping" not in enc:
        return None
    special = set(tok.all_special_ids)
    return ["template" if i in special else p for i, p in zip(ids, _by_offsets(chars, enc["offset_mapping"]),
                                                              strict=True)]
