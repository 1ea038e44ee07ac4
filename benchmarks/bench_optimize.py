"""Optimisation: what `raylab optimize` buys on CPU, int8 quantisation, structured pruning with
recovery and distillation into a half-size student, each against its parent (issue 27).

    python benchmarks/bench_optimize.py           (or: make bench NAME=optimize)
    python benchmarks/bench_optimize.py --smoke   # a tiny model, 1-2 steps, 1 pair: checks the script
                                                  # runs; writes no result (nor needs a clean tree)

Protocol: benchmarks/README.md (version 1). Written before it was run (item 9):

- **Model.** A Llama of 4 layers x 480 wide (the issue's 512 cannot lose a quarter of its 8 heads in
  transformers' Llama config: 512 % 6 != 0; 8 heads of 60 in 4 key/value groups of 2, MLP 1280,
  byte-level vocabulary with raylab's chat template, random weights, seed 0; common.small_llama
  with these dims), trained briefly by `raylab train` (a full fine-tune, 300 steps, lr 1e-3,
  batch 8, seed 0) on the Acme corpus as benchmarks read it (common.ACME_DATA, max_seq_len
  512) and registered: the parent of every result. float32, one torch thread on every side.
- **int8** (A: `raylab optimize` optimize.quantize=int8_weight_only, include_embeddings=true;
  B: the parent):
  - size on disk (every file of the registered version): 1 sample each (deterministic);
    goal A / B <= 0.3;
  - tokens/s at concurrency 1: raylab/optimize/measure.py's generation run (`tokens_per_s`:
    8 requests one at a time, 32 new tokens each, greedy, one warm-up request per sample) on
    the model loaded through `models.load` (the loader serve uses) with its forward wrapped
    in `torch.compile` (default mode) on both sides. raylab's transformers engine does not
    compile a model itself, so this is the model as it would be served compiled, not the Serve
    deployment. Compile time (the first generate call after wrapping, per side) is reported
    separately and excluded from the samples. 5 pairs, alternating; goal A / B >= 1.5;
  - eval loss on the data stage's val split (`evaluate.held_out_loss`, what the gates use):
    1 sample each (deterministic); goal A / B <= 1.02.
- **Pruning** (A: optimize.prune heads 0.25 (1 of 4 key/value groups = 2 of 8 heads) and
  mlp_channels 0.3, 32 calibration rows, 100 recovery steps at the train section's settings;
  B: the parent): tokens/s at concurrency 1 as above but eager on both sides (a smaller dense
  model needs no compiler to be faster), 5 pairs, goal A / B >= 1.3; eval loss as above, goal
  A / B <= 1.05.
- **Distillation** (A: optimize.distill student {num_hidden_layers: 2} (half the layers: about
  half the parameters besides the embeddings), T 2.0, alpha 0.5, 300 steps, lr 1e-3; B: the
  same student, same seed and steps, alpha 0 (cross-entropy only, the teacher not loaded)):
  the gap |student eval loss - teacher eval loss| on the val split; 3 seeds (train.seed 0, 1,
  2), A and B alternating per seed; goal A / B < 1 (the distilled student closer to the
  teacher).
- Speeds are machine figures; the ratios are what compares. Every point records the load
  average before each sample.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "bench-optimize"
# 480 wide, not 512: transformers' Llama config refuses a hidden size that is no multiple of the
# head count, and a quarter of 8 heads removed leaves 6 (512 % 6 != 0; 480 % 6 == 0)
DIMS = dict(hidden_size=480, intermediate_size=1280, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            head_dim=60)
FULL = dict(dims=DIMS, train_steps=300, recovery_steps=100, distill_steps=300, seeds=(0, 1, 2), pairs=5, requests=8,
            new_tokens=32, calibration=32)
# tiny, with 4 key/value groups so that 0.25 of the heads is one whole group, as in DIMS
SMOKE = dict(dims=dict(common.TINY, hidden_size=48, num_attention_heads=8, num_key_value_heads=4, head_dim=6), train_steps=2, recovery_steps=2, distill_steps=2, seeds=(0,), pairs=1, requests=1,
             new_tokens=4, calibration=4)


def base_raw(root: Path, model: Path, p: dict) -> dict:
    return {
        "version": 1, "offline": True, "output_dir": str(root / "run"), "data": copy.deepcopy(common.ACME_DATA),
        "model": {"name_or_path": str(model), "method": "full"},
        "train": {"lr": 1e-3, "batch_size": 8, "max_steps": p["train_steps"], "eval_every": max(1, p["train_steps"] // 3),
                  "log_every": max(1, p["train_steps"] // 10), "seed": 0},
        "registry": {"model_name": NAME},
    }


def with_(raw: dict, optimize: dict, **train) -> object:
    from raylab import config

    out = copy.deepcopy(raw)
    out["optimize"] = optimize | {"measure": None}  # measured here, under the protocol
    out["train"].update(train)
    return config.load_dict(out)


def load(store, ref: str, compiled: bool):
    import torch

    from raylab import models

    inf = models.load(ref, dtype="float32", store=store)
    model = inf.model.merge_and_unload() if inf.kind == "adapter" else inf.model
    model.eval()
    if compiled:
        model.forward = torch.compile(model.forward)
    return model, inf.tokenizer


def speed_point(store, name: str, a_ref: str, b_ref: str, p: dict, compiled: bool, goal: str, goal_ratio: float):
    """tokens/s at concurrency 1 of a_ref vs b_ref, alternating; compile time apart."""
    from raylab.optimize import measure

    sides, compile_s = {}, {}
    for label, ref in (("a", a_ref), ("b", b_ref)):
        sides[label] = load(store, ref, compiled)
        started = time.perf_counter()  # the first call compiles (or, eager, warms up): not a sample
        measure.tokens_per_s(*sides[label], 1, 1, p["new_tokens"])
        compile_s[label] = time.perf_counter() - started

    def sample(label):
        return lambda: measure.tokens_per_s(*sides[label], 1, p["requests"], p["new_tokens"])

    got = common.alternate(sample("a"), sample("b"), p["pairs"], warmup=False)  # warmed up above
    return common.point(name, "tokens/s", (a_ref, got["a"]), (b_ref, got["b"]), goal=goal, goal_ratio=goal_ratio,
                        warmup=True, load=got["load"], threads=1,
                        a_settings={"torch_compile": compiled, "first_call_s": compile_s["a"]},
                        b_settings={"torch_compile": compiled, "first_call_s": compile_s["b"]},
                        requests=p["requests"], new_tokens=p["new_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1-2 steps, 1 pair; writes no result")
    args = parser.parse_args()
    p = SMOKE if args.smoke else FULL
    import os

    tmp_home = tempfile.mkdtemp(prefix="bench-optimize-home-")  # its registry versions stay out of the user's
    os.environ["RAYLAB_HOME"] = tmp_home
    if not args.smoke:
        common.require_clean_commit()
    import torch

    torch.set_num_threads(1)
    from raylab import config, data, evaluate, registry, train
    from raylab.core import cluster, runs
    from raylab.optimize import measure, run_optimize

    records = []
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        root = Path(tmp)
        model = common.small_llama(root / "model", p["dims"])
        raw = base_raw(root, model, p)
        cfg = config.load_dict(raw)
        cluster.connect(cfg)
        data.run_data(cfg)
        trained = train.run_train(cfg)
        parent = f"{trained['registry']['name']}/{trained['registry']['version']}"
        store = registry.open_store(cfg)
        val = runs.read_manifest(runs.Run(cfg.output_dir), cfg.source).outputs["val"]

        def eval_loss(ref: str) -> float:
            return evaluate.held_out_loss(cfg, registry.fetch(store, ref), val)["loss"]

        def one(name, unit, a_ref, a, b_ref, b, goal, goal_ratio, higher, **extra):
            records.append(common.point(name, unit, (a_ref, [a]), (parent if b_ref is None else b_ref, [b]), goal=goal,
                                        goal_ratio=goal_ratio, higher_is_better=higher, warmup=False,
                                        load=[[common.load_average()]], threads=1, **extra))

        parent_loss = eval_loss(parent)
        # int8 weight-only, embeddings and LM head included
        q = run_optimize(with_(raw, {"quantize": "int8_weight_only", "include_embeddings": True}), parent, store=store)
        q_ref = f"{q['name']}/{q['version']}"
        one("int8 size on disk vs float32 parent", "bytes", q_ref, measure.disk_bytes(registry.fetch(store, q_ref)),
            parent, measure.disk_bytes(registry.fetch(store, parent)), "A / B <= 0.3 (issue 27)", 0.3, False)
        records.append(speed_point(store, "int8 tokens/s at concurrency 1, torch.compile", q_ref, parent, p, True,
                                   "A / B >= 1.5 (issue 27)", 1.5))
        one("int8 eval loss vs parent (val split)", "nats/token", q_ref, eval_loss(q_ref), parent, parent_loss,
            "A / B <= 1.02 (issue 27)", 1.02, False)

        # structured pruning, then the recovery fine-tune
        pr = run_optimize(with_(raw, {"prune": {"heads": 0.25, "mlp_channels": 0.3, "calibration_samples":
                                                p["calibration"], "recovery_steps": p["recovery_steps"]}}),
                          parent, store=store)
        pr_ref = f"{pr['name']}/{pr['version']}"
        records.append(speed_point(store, "pruned (25% heads, 30% MLP) tokens/s at concurrency 1, eager", pr_ref,
                                   parent, p, False, "A / B >= 1.3 (issue 27)", 1.3))
        one("pruned eval loss vs parent after recovery (val split)", "nats/token", pr_ref, eval_loss(pr_ref), parent,
            parent_loss, "A / B <= 1.05 (issue 27)", 1.05, False, parameters=pr["parameters"],
            parameters_before=pr["parameters_before"])

        # a half-size student: distilled (A) vs cross-entropy only (B), seed by seed, alternating
        gaps, losses = {"a": [], "b": []}, {"a": [], "b": []}
        load_avg = []
        for seed in p["seeds"]:
            pair = [common.load_average()]
            for side, alpha in (("a", 0.5), ("b", 0.0)):
                if side == "b":
                    pair.append(common.load_average())
                d = run_optimize(with_(raw, {"distill": {"student": {"num_hidden_layers": max(1, p["dims"][
                    "num_hidden_layers"] // 2)}, "temperature": 2.0, "alpha": alpha, "steps": p["distill_steps"],
                    "lr": 1e-3}}, seed=seed), parent, store=store)
                loss = eval_loss(f"{d['name']}/{d['version']}")
                losses[side].append(loss)
                gaps[side].append(abs(loss - parent_loss))
                print(f"  seed {seed} {'distilled' if alpha else 'CE only'}: eval loss {loss:.4f} "
                      f"(teacher {parent_loss:.4f})", file=sys.stderr, flush=True)
            load_avg.append(pair)
        records.append(common.point(
            "half-size student's eval-loss gap to the teacher: distilled vs cross-entropy only", "nats/token",
            ("distilled (T 2, alpha 0.5)", gaps["a"]), ("cross-entropy only (alpha 0)", gaps["b"]),
            goal="A / B < 1 (issue 27: the distilled student closer to the teacher)", goal_ratio=1.0,
            higher_is_better=False, warmup=False, load=load_avg, threads=1, seeds=list(p["seeds"]),
            teacher_eval_loss=parent_loss, eval_loss_distilled=losses["a"], eval_loss_ce_only=losses["b"]))
    if args.smoke:
        print(f"smoke: {len(records)} points measured; nothing written", file=sys.stderr)
    else:
        common.write_results("optimize", records)


if __name__ == "__main__":
    main()
