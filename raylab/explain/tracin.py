"""TracIn-style scores (Pruthi et al. 2020, "TracIn-CP"): how much each training document's
loss gradient aligns with an answer's, summed over saved checkpoints weighted by the
learning rate applied between them, on the LoRA parameters only.

    score(z) = sum_c  w_c * g_c(z) . g_c(answer)       g_c: d loss / d LoRA params at checkpoint c
    cosine(z) = sum_c w_c * cos(g_c(z), g_c(answer)) / sum_c w_c   (explain.influence.normalize ranks by it)

The losses are the training loss itself (`raylab.train.forward_sums`: next-token
cross-entropy summed over a document's target tokens, the block-causal mask of packed rows)
on each document alone: a packed row is unpacked by its `segment_ids` (positions restart at
0 per document in training too, so a document alone computes what it computed packed).
Summed, not averaged, because a training step adds each document's summed token loss (over
the window's target count), so the summed gradient is what the document pushed.

    Scorer(path, checkpoints, query, threads)      a Ray Data actor UDF over packed rows
    documents(input_ids, labels, segment_ids)      a packed row's documents
    doc_key(ids)                                   the join key with data/records/ (token ids)
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

IGNORE = -100
SCORES = pa.schema([("key", pa.string()), ("tokens", pa.int32()), ("score", pa.float64()), ("cosine", pa.float64()),
                    ("dots", pa.list_(pa.float64())), ("norms", pa.list_(pa.float64()))])


def doc_key(ids) -> str:
    """A document's identity by its token ids (what the data stage wrote for it)."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()[:24]


def documents(input_ids, labels, segment_ids, all_tokens: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each document of a packed row, in order; padding (segment 0) dropped.
    `all_tokens` (train.loss_on: all): every token a target but the document's first."""
    ids, lab, seg = (np.asarray(x) for x in (input_ids, labels, segment_ids))
    out = []
    for s in np.unique(seg[seg > 0]):
        at = seg == s
        d_ids, d_lab = ids[at].tolist(), lab[at].tolist()
        if all_tokens:
            d_lab = [IGNORE, *d_ids[1:]]
        out.append((d_ids, d_lab))
    return out


def trained_names(model) -> list[str]:
    """The adapter's parameters (LoRA matrices, DoRA magnitudes): the only ones whose gradients count."""
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def _sequence(ids: list[int], labels: list[int]) -> dict:
    import torch

    n = len(ids)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.arange(n).unsqueeze(0), "segment_ids": torch.ones(1, n, dtype=torch.long)}


def loss_grad(model, params: list, ids: list[int], labels: list[int], attn_impl: str):
    """d (summed target-token loss) / d params, flattened in float32; None without a target token."""
    import torch

    from raylab.train import forward_sums

    batch = _sequence(ids, labels)
    if not (batch["labels"][:, 1:] != IGNORE).any():
        return None
    with torch.enable_grad():
        sums = forward_sums(model, batch, attn_impl, accuracy=False)
        grads = torch.autograd.grad(sums.loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params, strict=True)])


def query(prompt: list[int], target: list[int]) -> tuple[list[int], list[int]]:
    """The answer as a training document: the prompt conditions, the target tokens are scored."""
    return [*prompt, *target], [IGNORE] * len(prompt) + list(target)


class Scorer:
    """Ray Data actor UDF: packed training rows -> one row per document with its score.

    `checkpoints`: [{"name", "model_dir" (a checkpoint's model/, or None: the version's own
    weights), "weight"}]. Each actor loads the version once, reads every checkpoint's adapter
    weights once (they are small) and computes the answer's gradient at each, then swaps the
    weights per checkpoint for each batch."""

    def __init__(self, path: str, checkpoints: list[dict], query_ids: list[int], query_labels: list[int],
                 threads: int, all_tokens: bool):
        import torch

        from raylab import models, train

        torch.set_num_threads(threads)
        self.model = models.load(path, with_tokenizer=False).model
        names = trained_names(self.model)
        named = dict(self.model.named_parameters())
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = [named[n].requires_grad_(True) for n in names]
        self.attn = train.attn_impl_of(self.model)
        self.all_tokens = all_tokens
        own = self._adapter_state()
        self.states, self.queries, self.weights = [], [], []
        for c in checkpoints:
            if c["model_dir"]:
                train.load_checkpoint_weights(self.model, c["model_dir"])
                self.states.append(self._adapter_state())
            else:  # the version's own weights, whatever checkpoint was loaded before
                self.states.append(own)
                self._use(len(self.states) - 1)
            g = loss_grad(self.model, self.params, query_ids, query_labels, self.attn)
            if g is None:
                raise ValueError("the answer has no target token")
            self.queries.append((g, float(g.norm())))
            self.weights.append(float(c["weight"]))

    def _adapter_state(self) -> dict:
        """Every adapter tensor (hybrid mode's fully trained modules too), not only the LoRA ones."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if "lora_" in k or "modules_to_save" in k}

    def _use(self, i: int) -> None:
        import torch

        with torch.no_grad():
            self.model.load_state_dict(self.states[i], strict=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs = [d for ids, lab, seg in zip(batch["input_ids"].to_pylist(), batch["labels"].to_pylist(),
                                           batch["segment_ids"].to_pylist(), strict=True)
                for d in documents(ids, lab, seg, self.all_tokens)]
        dots = [[0.0] * len(self.states) for _ in docs]
        norms = [[0.0] * len(self.states) for _ in docs]
        scored = [True] * len(docs)
        for c in range(len(self.states)):
            self._use(c)
            q, q_norm = self.queries[c]
            for i, (ids, lab) in enumerate(docs):
                g = loss_grad(self.model, self.params, ids, lab, self.attn)
                if g is None:  # nothing in it was trained on (a prompt-only turn): no influence
                    scored[i] = False
                    continue
                dots[i][c], norms[i][c] = float(g @ q), float(g.norm())
        rows = []
        for i, (ids, _) in enumerate(docs):
            if not scored[i]:
                continue
            cos = [d / (n * qn) if n and qn else 0.0 for d, n, (_, qn) in zip(dots[i], norms[i], self.queries, strict=True)]
            rows.append({"key": doc_key(ids), "tokens": len(ids),
                         "score": sum(w * d for w, d in zip(self.weights, dots[i], strict=True)),
                         "cosine": sum(w * x for w, x in zip(self.weights, cos, strict=True)) / (sum(self.weights) or 1.0),
                         "dots": dots[i], "norms": norms[i]})
        return pa.Table.from_pylist(rows, schema=SCORES)
