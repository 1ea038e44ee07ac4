"""Structured pruning of a Llama-family model: whole attention heads (whole key/value groups
with grouped-query attention) and whole MLP channels, the same number in every layer, ranked
by a Wanda-style importance score on calibration batches. No Ray, no registry.

    plan = plan_for(model.config, heads=0.25, mlp_channels=0.3)      # exit-2 errors for what cannot be done
    scores = importance(model, [ids, ...])                            # per layer: group scores, channel scores
    result = prune(model, plan, scores)                               # in place; model.config updated
    model.save_pretrained(out)                                        # reloads in plain transformers

The score (Wanda, Sun et al. 2023, summed over a structure): a weight W[i, j] of a Linear
whose input is X matters by |W[i, j]| * ||X[:, j]||_2 over the calibration tokens. A head is
the columns of o_proj its output feeds, so its score is the sum of that over those columns;
a key/value group's score is the sum over its query heads; an MLP channel is one column of
down_proj. Why Wanda rather than first-order Taylor |w * grad|: it needs forward passes only
(no backward, no optimizer state: it runs wherever the model can do inference, in eval mode),
its activation norm is what a head or channel contributes to the residual stream, and a head
whose output weights are zero scores exactly 0 (a Taylor score needs a loss whose gradient
through that head is informative, noisy on a small calibration sample).

Why slicing the Linear weights here rather than torch-pruning: for Llama-family blocks the
dependency graph is fixed and small (q/k/v/o_proj, gate/up/down_proj), GQA must drop whole
groups with their query heads, and the HF config must say one head count and one MLP width
per model; torch-pruning would need that shape forced onto it (its per-layer pruning ratios,
GQA head grouping, and the config rewritten by hand anyway), and would be a dependency for
~40 lines of indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylab.errors import UserError

KEY = "optimize.prune"
# Model types whose decoder layers are self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj
# with one num_attention_heads / num_key_value_heads / intermediate_size for every layer.
SUPPORTED = ("llama", "mistral")


@dataclass(frozen=True)
class Plan:
    """How many of each unit every layer loses (the same count in every layer)."""

    heads: int                 # num_attention_heads before
    kv_heads: int              # num_key_value_heads before
    head_dim: int
    channels: int              # intermediate_size before
    groups_removed: int        # key/value groups (each with heads // kv_heads query heads)
    channels_removed: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def heads_removed(self) -> int:
        return self.groups_removed * self.group_size


@dataclass
class Pruned:
    plan: Plan
    parameters_before: int
    parameters_after: int
    kept_groups: list[list[int]]      # per layer, the key/value groups kept (original indices)
    kept_channels: list[list[int]]    # per layer, the MLP channels kept


def check_family(config) -> None:
    """Exit 2 for a model whose blocks this module cannot slice."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"{KEY}: cannot prune a {kind!r} model; structured pruning slices Llama-family blocks "
                        f"(model_type {' or '.join(SUPPORTED)}: q/k/v/o_proj and gate/up/down_proj)")


def _count(fraction: float | None, total: int, key: str, unit: str, allowed=None) -> int:
    """round(fraction * total), half up; refused when that removes none or all, or when it
    is not in `allowed` (the message then lists the fractions that work)."""
    if fraction is None:
        return 0
    n = int(fraction * total + 0.5)
    if n < 1 or n >= total:
        raise UserError(f"{KEY}.{key}={fraction}: removes {n} of {total} {unit} per layer (rounded to whole "
                        f"{unit}); choose a fraction that leaves at least one and removes at least one "
                        f"(between {0.5 / total:.3g} and {(total - 0.5) / total:.3g})")
    if allowed is not None and n not in allowed:
        works = ", ".join(f"{g / total:.3g} ({g})" for g in allowed) or "none"
        raise UserError(f"{KEY}.{key}={fraction}: removing {n} of {total} {unit} per layer leaves a head count the "
                        f"model's transformers config refuses (hidden_size must be a multiple of the heads left); "
                        f"fractions that work: {works}")
    return n


def _accepts(config, heads: int, kv_heads: int) -> bool:
    """Whether the installed transformers accepts a config with these head counts (head_dim
    fixed): its Llama config requires hidden_size % num_attention_heads == 0 even with an
    explicit head_dim, so not every whole-group count reloads in plain transformers."""
    import copy

    trial = copy.deepcopy(config)
    trial.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    trial.num_attention_heads, trial.num_key_value_heads = heads, kv_heads
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:  # noqa: BLE001 - huggingface_hub's StrictDataclassClassValidationError is no ValueError
        return False
    return True


def plan_for(config, heads: float | None, mlp_channels: float | None) -> Plan:
    """The counts to remove per layer. With grouped-query attention the unit is a key/value
    group (its query heads go with it), so `heads` is rounded to whole groups; a count whose
    remaining heads the model's config class refuses is an exit 2 listing the fractions that
    work (rather than silently removing more or fewer than asked)."""
    check_family(config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    unit = "key/value groups" if n_kv < n_heads else "heads"
    size = n_heads // n_kv
    fits = [g for g in range(1, n_kv) if _accepts(config, (n_kv - g) * size, n_kv - g)]
    groups = _count(heads, n_kv, "heads", unit, allowed=fits)
    return Plan(heads=n_heads, kv_heads=n_kv, head_dim=head_dim, channels=config.intermediate_size,
                groups_removed=groups,
                channels_removed=_count(mlp_channels, config.intermediate_size, "mlp_channels", "MLP channels"))


def _layers(model):
    return model.model.layers


def importance(model, batches) -> tuple[list, list]:
    """Per layer: (key/value group scores [kv_heads], MLP channel scores [intermediate_size]),
    from forward passes over `batches` (LongTensors [1, T] of real tokens, no padding)."""
    import torch

    layers = _layers(model)
    sq_attn = [None] * len(layers)   # sum over tokens of x^2, per o_proj input column
    sq_mlp = [None] * len(layers)    # the same for down_proj's input

    def hook(store, i):
        def record(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x * x).sum(0)
            store[i] = s if store[i] is None else store[i] + s
        return record

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.self_attn.o_proj.register_forward_pre_hook(hook(sq_attn, i)),
        layer.mlp.down_proj.register_forward_pre_hook(hook(sq_mlp, i)))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if sq_attn[0] is None:
        raise UserError(f"{KEY}.calibration_samples: no calibration tokens reached the model")
    cfg = model.config
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    group_scores, channel_scores = [], []
    for i, layer in enumerate(layers):
        w_o = layer.self_attn.o_proj.weight.detach().float().abs()       # [hidden, heads * head_dim]
        per_column = w_o.sum(0) * sq_attn[i].sqrt()                      # sum_i |W[i, j]| * ||X_j||
        group_scores.append(per_column.reshape(n_kv, -1).sum(1).cpu())   # a group's query heads are contiguous
        w_d = layer.mlp.down_proj.weight.detach().float().abs()          # [hidden, intermediate]
        channel_scores.append((w_d.sum(0) * sq_mlp[i].sqrt()).cpu())
    return group_scores, channel_scores


def _slice(linear, keep, dim: int):
    """A new Linear holding only the `keep` indices of its outputs (dim 0) or inputs (dim 1)."""
    import torch

    weight = linear.weight.detach().index_select(dim, keep.to(linear.weight.device))
    bias = linear.bias
    out_features, in_features = weight.shape
    new = torch.nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach() if dim == 1 else bias.detach().index_select(0, keep.to(bias.device)))
    return new


def _rows(units, width: int):
    """The row indices of whole units (heads or groups) `units`, each `width` rows wide."""
    import torch

    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def prune(model, plan: Plan, scores: tuple[list, list]) -> Pruned:
    """Remove, in every layer, the `plan.groups_removed` lowest-scoring key/value groups (with
    their query heads) and the `plan.channels_removed` lowest-scoring MLP channels; update the
    config so `from_pretrained` builds the smaller shapes (head_dim is written out: it no
    longer equals hidden_size // num_attention_heads)."""
    import torch

    before = sum(p.numel() for p in model.parameters())
    group_scores, channel_scores = scores
    kept_groups, kept_channels = [], []
    keep_g = plan.kv_heads - plan.groups_removed
    keep_c = plan.channels - plan.channels_removed
    for i, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if plan.groups_removed:
            # the highest scores stay; sorted, so the kept heads keep their order (RoPE is per head, order-free,
            # but an unchanged order makes the result easy to compare with its parent)
            groups = torch.sort(torch.topk(group_scores[i], keep_g).indices).values
            heads = _rows(groups, plan.group_size)
            q_rows, kv_rows = _rows(heads, plan.head_dim), _rows(groups, plan.head_dim)
            attn.q_proj = _slice(attn.q_proj, q_rows, 0)
            attn.k_proj = _slice(attn.k_proj, kv_rows, 0)
            attn.v_proj = _slice(attn.v_proj, kv_rows, 0)
            attn.o_proj = _slice(attn.o_proj, q_rows, 1)
            kept_groups.append(groups.tolist())
        else:
            kept_groups.append(list(range(plan.kv_heads)))
        if plan.channels_removed:
            channels = torch.sort(torch.topk(channel_scores[i], keep_c).indices).values
            mlp.gate_proj = _slice(mlp.gate_proj, channels, 0)
            mlp.up_proj = _slice(mlp.up_proj, channels, 0)
            mlp.down_proj = _slice(mlp.down_proj, channels, 1)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = keep_c
            kept_channels.append(channels.tolist())
        else:
            kept_channels.append(list(range(plan.channels)))
    cfg = model.config
    cfg.head_dim = plan.head_dim
    cfg.num_attention_heads = keep_g * plan.group_size
    cfg.num_key_value_heads = keep_g
    cfg.intermediate_size = keep_c
    after = sum(p.numel() for p in model.parameters())
    return Pruned(plan, before, after, kept_groups, kept_channels)
