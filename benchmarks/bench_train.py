"""Training throughput: raylab's train stage vs a bare PyTorch + PEFT loop, 2 workers vs 1,
and packed vs padded sequences, on the quickstart corpus.

Same model (a 4-layer Llama, hidden 256, byte-level vocabulary, random weights, saved with
save_pretrained), LoRA r=8 on all linear layers, batch 8 x 512 tokens, AdamW, the same
block-diagonal attention mask and position ids, fp32 on CPU, torch threads = cores.

    raylab    `raylab.train.run_train` on an embedded Ray (TorchTrainer, 1 worker), data
              streamed from the data stage's Parquet shards through Ray Data
    baseline  a plain loop in this process: the same shards read with pyarrow into memory,
              peft.get_peft_model, model(..., labels=...), backward, clip, AdamW step

Throughput is real (non-padding) tokens per second over the training steps after the
first logging interval (warm-up), data fetching included, evaluation and start-up
excluded on both sides. The end-to-end wall time (Ray start, workers, evaluation, checkpoints)
is reported alongside for information.

    pip install -e ".[bench]" && python benchmarks/bench_train.py [--steps 30]

Targets (issue 4): raylab / bare >= 0.95; packed / padded real-token throughput >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measurement, small_llama, write_results  # noqa: E402

from raylab import config, data, train  # noqa: E402
from raylab.core import cluster, plan  # noqa: E402
from raylab.train import loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 5


def job(root: Path, name: str, model_dir: Path, steps: int, **overrides) -> config.RaylabConfig:
    items = [f"output_dir={root / name}", f"model.name_or_path={model_dir}", f"train.max_steps={steps}",
             f"train.eval_every={steps}", f"train.log_every={LOG_EVERY}", "train.num_workers=1",
             "train.batch_size=8", "train.grad_accum=1", "model.lora.dropout=0.0",
             "pretrain=null",  # the benchmark's own model is the base: no stand-in pre-training
             "registry.enabled=false"]  # benchmarks stay out of the user's registry
    items += [f"{k}={v}" for k, v in overrides.items()]
    return config.load(REPO / "configs" / "quickstart.yaml", items)


def steady_throughput(train_dir: Path) -> float:
    """Real tokens / training seconds over the logged intervals after the first one."""
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]
    tokens = seconds = 0.0
    for prev, row in zip(rows, rows[1:], strict=False):
        interval = row["tokens"] - prev["tokens"]
        tokens += interval
        seconds += interval / row["tokens_per_s"]
    return tokens / seconds


def raylab_run(cfg: config.RaylabConfig) -> dict:
    start = time.perf_counter()
    meta = train.run_train(cfg)
    wall = time.perf_counter() - start
    return {"tokens_per_s": steady_throughput(Path(cfg.output_dir) / "train"), "wall_s": wall,
            "tokens": meta["trained_tokens"], "steps": meta["steps"]}


def bare_run(cfg: config.RaylabConfig, steps: int, threads: int) -> dict:
    """The baseline: the same shards, model, LoRA, batch, mask and optimizer, no Ray."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    table = pq.read_table(Path(cfg.output_dir) / "data" / "train")
    cols = {k: torch.tensor(table[k].to_pylist()) for k in ("input_ids", "labels", "position_ids", "segment_ids", "num_tokens")}
    n = cols["input_ids"].shape[0]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    tokens = seconds = 0.0
    start = time.perf_counter()
    for step in range(steps):
        tic = time.perf_counter()
        idx = torch.arange(step * 8, step * 8 + 8) % n
        batch = {k: v[idx] for k, v in cols.items()}
        mask = loss.block_causal_mask(batch["segment_ids"], "sdpa", torch.float32)
        out = model(input_ids=batch["input_ids"].long(), attention_mask=mask, position_ids=batch["position_ids"].long(),
                    labels=batch["labels"].long())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= LOG_EVERY:  # the same warm-up as raylab's first logging interval
            seconds += time.perf_counter() - tic
            tokens += int(batch["num_tokens"].sum())
    return {"tokens_per_s": tokens / seconds, "wall_s": time.perf_counter() - start, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="raylab-bench-train-"))
    records = []
    try:
        model_dir = small_llama(root / "model")
        packed = job(root, "packed", model_dir, args.steps)
        padded = job(root, "padded", model_dir, args.steps, **{"data.packing": "pad"})
        two = job(root, "two", model_dir, args.steps, **{"train.num_workers": 2})
        cluster.connect(packed, state_api=True)
        data.run_data(packed)
        data.run_data(padded)
        shutil.copytree(root / "packed" / "data", root / "two" / "data")
        threads = plan.make_plan(packed, plan.cluster_nodes()).torch_threads

        bare = bare_run(packed, args.steps, threads)
        one = raylab_run(packed)
        records.append(measurement(
            "train_tokens_per_s_1_worker", one["tokens_per_s"], "real tokens/s", "bare PyTorch+PEFT loop",
            bare["tokens_per_s"], target=">= 0.95", steps=args.steps, threads=threads,
            raylab_wall_s=one["wall_s"], baseline_wall_s=bare["wall_s"],
            note="steady state after the first logging interval; wall times include Ray start-up, evaluation, checkpoints"))
        pad = raylab_run(padded)
        records.append(measurement(
            "train_real_tokens_per_s_packed_vs_padded", one["tokens_per_s"], "real tokens/s", "raylab, data.packing=pad",
            pad["tokens_per_s"], target=">= 1.5", steps=args.steps))
        dual = raylab_run(two)
        records.append(measurement(
            "train_tokens_per_s_2_workers_vs_1", dual["tokens_per_s"], "real tokens/s", "raylab, 1 worker",
            one["tokens_per_s"], steps=args.steps, cores=threads,
            note="2 workers x 1 thread vs 1 worker x 2 threads on the same cores; global batch doubles"))
        write_results("train", records)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
