"""Structured pruning of a tiny random Llama built from config (raylab/optimize/prune.py), no
Ray, no registry: the parameter count drops by exactly what the plan removes; whole key/value
groups go with their query heads (GQA); the saved result reloads and runs in a fresh process
with plain transformers (no raylab import); Wanda scores rank a head or channel whose output
weights are zero last, and removing it leaves the model's function unchanged (while removing
a live one changes it: the negative control); what cannot be pruned exits 2 naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from raylab import config
from raylab.errors import ConfigError, UserError
from raylab.optimize import prune as p

# hidden 48: transformers' LlamaConfig wants hidden_size to be a multiple of the heads left (6 of 8 here)
HIDDEN, HEADS, KV, HEAD_DIM, MLP, LAYERS = 48, 8, 4, 8, 96, 2
IDS = [torch.tensor([[5, 60, 70, 80, 90, 100, 110, 3, 44, 200, 17, 33]]), torch.tensor([[9, 8, 7, 250, 1, 2, 3]])]


def tiny_llama(seed: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=260, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS[0]).logits


def zero_group(model, layer: int, group: int) -> None:
    """Zero the o_proj columns of one key/value group's query heads: the group then adds nothing."""
    width = HEADS // KV * HEAD_DIM
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight[:, group * width:(group + 1) * width] = 0


def test_parameter_count_drops_by_exactly_the_removed_heads_and_channels_and_reloads_without_raylab(tmp_path):
    model = tiny_llama()
    before = sum(t.numel() for t in model.parameters())
    plan = p.plan_for(model.config, heads=0.25, mlp_channels=0.3)
    # 0.25 of 4 key/value groups = 1 group = 2 of 8 query heads; 0.3 of 96 channels = 28.8 -> 29
    assert (plan.groups_removed, plan.heads_removed, plan.channels_removed) == (1, 2, 29)
    result = p.prune(model, plan, p.importance(model, IDS))
    removed_per_layer = (2 * HIDDEN * plan.heads_removed * HEAD_DIM        # q_proj rows, o_proj columns
                         + 2 * HIDDEN * plan.groups_removed * HEAD_DIM     # k_proj, v_proj rows
                         + 3 * HIDDEN * plan.channels_removed)             # gate/up rows, down columns
    after = sum(t.numel() for t in model.parameters())
    assert (result.parameters_before, result.parameters_after) == (before, after)
    assert before - after == LAYERS * removed_per_layer
    # the requested fractions of each layer's attention and MLP weights, within rounding to whole units
    attn_weights = 2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV * HEAD_DIM  # q + o, k + v
    attn_removed = 2 * HIDDEN * plan.heads_removed * HEAD_DIM + 2 * HIDDEN * plan.groups_removed * HEAD_DIM
    assert attn_removed / attn_weights == pytest.approx(0.25)
    assert plan.channels_removed / MLP == pytest.approx(0.3, abs=0.5 / MLP)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (6, 3, 67, HEAD_DIM)
    expected = logits(model)

    model.save_pretrained(tmp_path / "m")
    reload = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
              "assert not any(k.startswith('raylab') for k in sys.modules)\n"
              "ids = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 3, 44, 200, 17, 33]])\n"
              "with torch.no_grad(): torch.save({'logits': m(input_ids=ids).logits, "
              "'n': sum(t.numel() for t in m.parameters())}, sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", reload, str(tmp_path / "m"), str(tmp_path / "out.pt")], check=True,
                   timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert got["n"] == after  # a genuinely smaller dense model, no masks
    torch.testing.assert_close(got["logits"], expected)


def test_gqa_removes_whole_key_value_groups_with_their_query_heads():
    model = tiny_llama()
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    k0 = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    zero_group(model, 0, 1)  # layer 0 loses group 1; layer 1 its own lowest group
    plan = p.plan_for(model.config, heads=0.25, mlp_channels=None)
    result = p.prune(model, plan, p.importance(model, IDS))
    assert result.kept_groups[0] == [0, 2, 3] and len(result.kept_groups[1]) == 3
    attn = model.model.layers[0].self_attn
    heads = [h for g in (0, 2, 3) for h in (2 * g, 2 * g + 1)]  # 2 query heads per group, contiguous
    torch.testing.assert_close(attn.q_proj.weight, q0.reshape(HEADS, HEAD_DIM, HIDDEN)[heads].reshape(-1, HIDDEN))
    torch.testing.assert_close(attn.k_proj.weight, k0.reshape(KV, HEAD_DIM, HIDDEN)[[0, 2, 3]].reshape(-1, HIDDEN))
    assert model.config.num_attention_heads // model.config.num_key_value_heads == HEADS // KV  # groups intact
    assert model.config.intermediate_size == MLP and result.kept_channels[0] == list(range(MLP))


def test_a_dead_head_group_and_channel_rank_last_and_removing_them_keeps_the_function():
    model = tiny_llama()
    for layer in range(LAYERS):
        zero_group(model, layer, 2)
        with torch.no_grad():
            model.model.layers[layer].mlp.down_proj.weight[:, 40] = 0
    groups, channels = p.importance(model, IDS)
    for layer in range(LAYERS):
        assert groups[layer][2] == 0 and all(groups[layer][g] > 0 for g in (0, 1, 3))
        assert channels[layer][40] == 0 and int(torch.argmin(channels[layer])) == 40
    reference = logits(model)
    one_group, one_channel = 1 / KV, 1 / MLP
    plan = p.plan_for(model.config, heads=one_group, mlp_channels=one_channel)
    assert (plan.groups_removed, plan.channels_removed) == (1, 1)
    pruned = p.prune(model, plan, (groups, channels))
    assert all(2 not in kept for kept in pruned.kept_groups) and all(40 not in kept for kept in pruned.kept_channels)
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=1e-5)  # they contributed nothing

    # negative control: the same plan with scores that point at a live group and channel changes the outputs
    other = tiny_llama()
    for layer in range(LAYERS):
        zero_group(other, layer, 2)
    reference = logits(other)
    wrong = ([torch.tensor([5.0, 0.0, 5.0, 5.0])] * LAYERS, [torch.arange(MLP, 0, -1).float()] * LAYERS)
    p.prune(other, plan, wrong)  # removes group 1 and channel 95: both alive
    assert (logits(other) - reference).abs().max() > 1e-3


def test_what_cannot_be_pruned_exits_2_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r"optimize.prune: cannot prune a 'gpt2' model"):
        p.plan_for(GPT2Config(n_layer=1, n_embd=32, n_head=2), heads=0.5, mlp_channels=None)
    cfg = tiny_llama().config
    with pytest.raises(UserError, match=r"optimize.prune.heads=0.1: removes 0 of 4 key/value groups"):
        p.plan_for(cfg, heads=0.1, mlp_channels=None)
    with pytest.raises(UserError, match=r"optimize.prune.mlp_channels=0.999: removes 96 of 96"):
        p.plan_for(cfg, heads=None, mlp_channels=0.999)
    # 3 of 4 groups leave 2 heads (48 % 2 == 0: fine); 64 wide, 1 of 4 groups leaves 6 heads: refused
    assert p.plan_for(cfg, heads=0.75, mlp_channels=None).heads_removed == 6
    wide = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    with pytest.raises(UserError, match=r"optimize.prune.heads=0.25: removing 1 of 4 .* fractions that work: 0.5 \(2\), "
                                        r"0.75 \(3\)"):
        p.plan_for(wide, heads=0.25, mlp_channels=None)
    base = {"version": 1, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]}}
    for prune, key in (({"heads": 1.0}, "optimize.prune.heads"), ({"mlp_channels": 0}, "optimize.prune.mlp_channels"),
                       ({"heads": -0.2}, "optimize.prune.heads"), ({}, "optimize.prune.heads"),
                       ({"heads": 0.5, "recovery_step": 3}, "optimize.prune.recovery_step")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.load_dict(base | {"optimize": {"prune": prune}})
    with pytest.raises(ConfigError, match=r"optimize\.prune"):
        config.load_dict(base | {"optimize": {"prune": {"heads": 0.5}, "quantize": "int8_dynamic"}})
    ok = config.load_dict(base | {"optimize": {"prune": {"heads": 0.5, "mlp_channels": 0.3}}}).optimize.prune
    assert (ok.heads, ok.mlp_channels, ok.calibration_samples, ok.recovery_steps) == (0.5, 0.3, 32, 50)
