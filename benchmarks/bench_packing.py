"""Peak memory of one packed training step, CPU: packing passed as restarting position ids
only (transformers builds the mask; what raylab gives flash_attention_2 and flex_attention)
against the dense `[batch, 1, seq, seq]` block-causal mask raylab builds for eager and SDPA.

    python benchmarks/bench_packing.py          (or: make bench NAME=packing)

Written before the recorded run (protocol item 9). Four single samples probed first (sdpa:
positions 1011 and 1076 MiB, dense 781 and 783) showed positions-only costing more on CPU,
so raylab keeps its own mask for eager and SDPA; this benchmark records that comparison.

- **Problem.** A Llama with benchmarks/common.py's SMALL dims (4 layers, hidden 256, 8 heads,
  4 key/value heads, intermediate 704), `max_position_embeddings` 2048, random weights (seed
  0), LoRA r=8 on all linear layers (raylab's `apply_method`). One micro-batch of 2 packed
  rows at seq 2048, each holding documents of 64-400 tokens (seed 0) and a padded tail;
  forward, the summed token loss, backward. fp32, one torch thread.
- **A:** the step with positions only (no `attention_mask`; transformers builds the mask
  the kernel takes). **B:** the same step with `loss.block_causal_mask` as
  `attention_mask` (what `loss.forward` passes for eager and SDPA). Both with `attn_implementation` sdpa, and
  a second point with eager.
- **Metric.** The step's peak memory: the process's resident-set high-water mark during the
  step (Linux `VmHWM`, reset through `/proc/self/clear_refs` just before the step) minus its
  resident set at that moment (model, optimizer-free LoRA, batch already built). One fresh
  process per sample, so no allocator cache carries over. Protocol item 10's 0.2 s PSS
  sampling would miss a step's peak, hence the kernel's own high-water mark; one process per
  side, so RSS and PSS count the same pages.
- **Goal** (issue 22): A / B <= 0.5. Expected here: not met on CPU, because transformers
  builds a dense boolean mask for SDPA and eager from the positions too; the saving needs
  FlashAttention-2's variable-length kernel or flex attention, both GPU-only for training
  (no GPU was lent). The figure is recorded whatever it is.
- Repeats: 5 pairs per point, A and B alternating, no warm-up (each sample is a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEQ, ROWS, REPEATS = 2048, 2, 5


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _batch(tok):
    import random

    import pyarrow as pa
    import torch

    from raylab.data.packing import pack_batch

    rng = random.Random(0)
    documents = []
    while sum(len(d) for d in documents) < ROWS * SEQ - 300:
        documents.append([rng.randrange(3, len(tok)) for _ in range(rng.randrange(64, 401))])
    rows = pack_batch(pa.table({"input_ids": documents, "labels": documents}), SEQ, tok.pad_token_id, "pack").to_pylist()
    rows = rows[:ROWS]
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "segment_ids")}


def sample(side: str, impl: str) -> float:
    """One step in this (fresh) process; returns its peak memory above the step's start, MiB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raylab.config import ModelConfig
    from raylab.models import apply_method, build_byte_tokenizer
    from raylab.train import loss

    torch.set_num_threads(1)
    tok = build_byte_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), max_position_embeddings=SEQ, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common.SMALL)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_config(cfg), ModelConfig(name_or_path="preset:tiny-llama", lora={"r": 8}))
    model.train()
    batch = _batch(tok)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _kb("VmRSS")
    mask = None if side == "positions" else loss.block_causal_mask(batch["segment_ids"], impl, torch.float32)
    out = model(input_ids=batch["input_ids"].long(), attention_mask=mask, position_ids=batch["position_ids"].long(),
                use_cache=False)
    sums = loss.token_sums(batch, out)
    sums.loss.backward()
    return (_kb("VmHWM") - start) / 1024


def _run(side: str, impl: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--sample", side, "--impl", impl], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--sample", choices=["positions", "dense"])
    args.add_argument("--impl", default="sdpa")
    ns = args.parse_args()
    if ns.sample:
        print(sample(ns.sample, ns.impl))
        return
    common.require_clean_commit()
    records = []
    for impl in ("sdpa", "eager"):
        got = common.alternate(lambda impl=impl: _run("positions", impl), lambda impl=impl: _run("dense", impl),
                               REPEATS, warmup=False)
        settings = {"attn_implementation": impl, "seq": SEQ, "rows": ROWS, "dims": common.SMALL, "lora_r": 8}
        records.append(common.point(
            f"packed step peak memory, {impl}, seq {SEQ} x {ROWS} rows", "MiB",
            ("positions only (transformers builds the mask)", got["a"]), ("dense block mask built by raylab", got["b"]),
            goal="A / B <= 0.5 (issue 22 item 4)", goal_ratio=0.5, higher_is_better=False, warmup=False,
            load=got["load"], a_settings=settings, b_settings=settings, threads=1))
    common.write_results("packing", records)
    print(json.dumps([{k: r[k] for k in ("name", "ratio", "ratio_q1", "ratio_q3", "met")} for r in records], indent=1))


if __name__ == "__main__":
    main()
