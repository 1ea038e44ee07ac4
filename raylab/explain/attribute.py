"""Token attributions with captum: each output token's log-probability (given the prompt
and the target tokens before it: teacher forcing) attributed to the prompt's tokens.

    rows, deltas = integrated_gradients(model, prompt_ids, target_ids, n_steps=64, baseline_id=pad)
    rows = perturbation(model, tok, prompt_ids, target_ids, "feature_ablation", baseline_id=pad)
    # rows: [len(target_ids)][len(prompt_ids)] floats

Integrated gradients run captum's `LayerIntegratedGradients` on the input embedding layer
once per output token, because captum 0.9's `LLMGradientAttribution` fails with
`return_convergence_delta=True` and the delta is what says whether `n_steps` was enough.
The baseline is the baseline token's embedding at every prompt position; the target tokens
before the one explained are the same in input and baseline, so they get exactly zero and
the prompt's attributions sum (completeness) to logp(input) - logp(baseline) - delta.

The perturbation methods go through captum's `LLMAttribution` over a `TextTokenInput`
built from the ids raylab rendered (`IdsTokenInput`: the chat template applied once, as in
training and serving, not re-tokenized from text).
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


def ids_token_input(prompt: list[int], tokenizer, baseline_id: int):
    """captum's TextTokenInput over ids already rendered: every token a feature, the baseline
    token in place of an absent one."""
    import torch

    TextTokenInput = captum_attr().TextTokenInput

    class IdsTokenInput(TextTokenInput):
        # TextTokenInput's own __init__ re-encodes a string (adding special tokens again to a
        # rendered chat prompt); the fields it sets are set here from the ids themselves.
        def __init__(self):  # no super().__init__(): it would tokenize
            self.inp_tensor = torch.tensor([prompt], dtype=torch.long)
            self.itp_tensor = self.inp_tensor
            self.itp_mask = None
            self.skip_tokens = None
            self.values = tokenizer.convert_ids_to_tokens(list(prompt))
            self.tokenizer = tokenizer
            self.n_itp_features = len(prompt)
            self.baselines = int(baseline_id)

    return IdsTokenInput()


def perturbation(model, tokenizer, prompt: list[int], target: list[int], method: str, baseline_id: int,
                 samples: int = 25, seed: int = 0) -> list[list[float]]:
    """[output x input] attributions by feature_ablation or shapley_sampling (no gradients)."""
    import torch

    attr = captum_attr()
    algo = {"feature_ablation": attr.FeatureAblation, "shapley_sampling": attr.ShapleyValueSampling}[method](model)
    llm = attr.LLMAttribution(algo, tokenizer)
    kwargs = {"n_samples": samples} if method == "shapley_sampling" else {}
    torch.manual_seed(seed)  # Shapley sampling draws its permutations from torch's generator
    with torch.no_grad():
        # forward_in_tokens=False: one teacher-forced pass over prompt + target, as integrated
        # gradients score it, instead of re-decoding the target token by token
        res = llm.attribute(ids_token_input(prompt, tokenizer, baseline_id), target=torch.tensor(target),
                            forward_in_tokens=False, **kwargs)
    return res.token_attr.detach().float().cpu().tolist()
