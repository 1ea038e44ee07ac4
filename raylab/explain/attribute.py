"""Token attributions with captum: each output token's log-probability (given the prompt
and the target tokens before it: teacher forcing) attributed to the prompt's tokens.

    rows, deltas = integrated_gradients(model, prompt_ids, target_ids, n_steps=64, baseline_id=pad)
    rows = perturbation(model, tok, prompt_ids, target_ids, "feature_ablation", baseline_id=pad)
    # rows: [len(target_ids)][len(prompt_ids)] floats
    rows = perturbation(..., groups=[[3, 4, 5], [6, 7]])    # [len(target_ids)][2]: one per span

Integrated gradients run captum's `LayerIntegratedGradients` on the input embedding layer
once per output token, because captum 0.9's `LLMGradientAttribution` fails with
`return_convergence_delta=True` and the delta is what says whether `n_steps` was enough.
The baseline is the baseline token's embedding at every prompt position; the target tokens
before the one explained are the same in input and baseline, so they get exactly zero and
the prompt's attributions sum (completeness) to logp(input) - logp(baseline) - delta.

The perturbation methods go through captum's `LLMAttribution` over a `TextTokenInput`
built from the ids raylab rendered (`IdsTokenInput`: the chat template applied once, as in
training and serving, not re-tokenized from text), or over spans (`IdsSpanInput`: a feature
mask, each span's tokens replaced by the baseline token together; spans.py finds them).
SHAP (shap's TeacherForcing) is in textshap.py.
"""

from __future__ import annotations

from raylab.errors import UserError

INSTALL = "pip install 'raylab[explain]'"


def captum_attr():
    """captum.attr, or exit 2 naming the extra that installs it."""
    try:
        import captum.attr as attr
    except ImportError:
        raise UserError(f"raylab explain needs captum, which is not installed: {INSTALL}") from None
    return attr


def _token_logprob(model, token_id: int):
    """f(ids) -> log p(token_id | ids) at the last position, one value per row."""

    def f(ids):
        logits = model(input_ids=ids).logits
        if logits.dim() == 4:  # a multi-head output (1, heads, seq, vocab): the first head decodes
            logits = logits[:, 0]
        return logits[:, -1].float().log_softmax(-1)[:, token_id]

    return f


def integrated_gradients(model, prompt: list[int], target: list[int], n_steps: int, baseline_id: int,
                         internal_batch_size: int | None = None) -> tuple[list[list[float]], list[float]]:
    """([output x input] attributions, the convergence delta of each output token)."""
    import torch

    attr = captum_attr()
    n = len(prompt)
    rows, deltas = [], []
    for t, token_id in enumerate(target):
        ids = torch.tensor([prompt + target[:t]], dtype=torch.long, device=model.device)
        base = ids.clone()
        base[0, :n] = baseline_id
        lig = attr.LayerIntegratedGradients(_token_logprob(model, token_id), model.get_input_embeddings())
        with torch.enable_grad():
            values, delta = lig.attribute(ids, baselines=base, n_steps=n_steps, return_convergence_delta=True,
                                          internal_batch_size=internal_batch_size or n_steps)
        rows.append(values.sum(-1)[0, :n].detach().float().cpu().tolist())  # one number per token: sum over width
        deltas.append(float(delta.reshape(-1)[0]))
    return rows, deltas


def token_logprob(model, ids: list[int], token_id: int) -> float:
    """log p(token_id | ids): what a row of attributions explains (tests check completeness with it)."""
    import torch

    with torch.no_grad():
        return float(_token_logprob(model, token_id)(torch.tensor([ids], device=model.device))[0])


def _from_ids(inp, prompt: list[int], tokenizer, baseline_id: int) -> None:
    # TextTokenInput's own __init__ re-encodes a string (adding special tokens again to a
    # rendered chat prompt); the fields it sets are set here from the ids themselves
    import torch

    inp.inp_tensor = torch.tensor([prompt], dtype=torch.long)
    inp.itp_tensor = inp.inp_tensor
    inp.itp_mask = None
    inp.skip_tokens = None
    inp.values = tokenizer.convert_ids_to_tokens(list(prompt))
    inp.tokenizer = tokenizer
    inp.n_itp_features = len(prompt)
    inp.baselines = int(baseline_id)


def ids_token_input(prompt: list[int], tokenizer, baseline_id: int):
    """captum's TextTokenInput over ids already rendered: every token a feature, the baseline
    token in place of an absent one."""

    class IdsTokenInput(captum_attr().TextTokenInput):
        def __init__(self):  # no super().__init__(): it would tokenize
            _from_ids(self, prompt, tokenizer, baseline_id)

    return IdsTokenInput()


def ids_span_input(prompt: list[int], tokenizer, baseline_id: int, groups: list[list[int]]):
    """The same with a feature mask: one feature per group of token positions (a span), whose
    tokens all become the baseline token when it is absent; tokens in no group always stay."""
    import torch

    class IdsSpanInput(captum_attr().TextTokenInput):
        # still a TextTokenInput (LLMAttribution takes only its own input classes), with one
        # interpretable entry per span instead of one per token
        def __init__(self):  # no super().__init__(): it would tokenize
            _from_ids(self, prompt, tokenizer, baseline_id)
            self.groups = [torch.tensor(g, dtype=torch.long) for g in groups]
            self.values = [tokenizer.decode([prompt[i] for i in g]) for g in groups]
            self.n_itp_features = len(groups)

        def to_tensor(self):
            return torch.ones((1, len(self.groups)), dtype=torch.long)

        def to_model_input(self, perturbed_tensor=None):
            if perturbed_tensor is None:
                return self.inp_tensor
            out = self.inp_tensor.expand(perturbed_tensor.size(0), -1).clone().to(perturbed_tensor.device)
            for j, group in enumerate(self.groups):
                rows = (perturbed_tensor[:, j] != 1).nonzero().reshape(-1, 1)
                out[rows, group.to(out.device).reshape(1, -1)] = self.baselines
            return out

    return IdsSpanInput()


def perturbation(model, tokenizer, prompt: list[int], target: list[int], method: str, baseline_id: int,
                 samples: int = 25, seed: int = 0, groups: list[list[int]] | None = None) -> list[list[float]]:
    """[output x input] attributions by feature_ablation or shapley_sampling (no gradients);
    with `groups` (token positions per span), [output x span]."""
    import torch

    attr = captum_attr()
    algo = {"feature_ablation": attr.FeatureAblation, "shapley_sampling": attr.ShapleyValueSampling}[method](model)
    llm = attr.LLMAttribution(algo, tokenizer)
    kwargs = {"n_samples": samples} if method == "shapley_sampling" else {}
    torch.manual_seed(seed)  # Shapley sampling draws its permutations from torch's generator
    with torch.no_grad():
        # forward_in_tokens=False: one teacher-forced pass over prompt + target, as integrated
        # gradients score it, instead of re-decoding the target token by token
        inp = (ids_token_input(prompt, tokenizer, baseline_id) if groups is None
               else ids_span_input(prompt, tokenizer, baseline_id, groups))
        res = llm.attribute(inp, target=torch.tensor(target),
                            forward_in_tokens=False, **kwargs)
    return res.token_attr.detach().float().cpu().tolist()
