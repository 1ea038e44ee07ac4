"""Training metrics: FLOPs accounting, the machine's measured peak, the progress line,
`metrics.jsonl` and the loss-curve PNG.

FLOPs per trained token (stated so the numbers can be checked):

    4 * N  +  2 * N_trainable  +  12 * L * d * S

N counts the parameters a token's matmuls touch (every weight except the input embedding
table, which is a lookup; a tied table counts once, as the output head); the forward pass
costs 2N and the input-gradient half of the backward pass another 2N; the weight-gradient
half costs 2 per *trainable* parameter (so LoRA pays ~4N and full fine-tuning 6N, the usual
6N of Kaplan et al.); attention scores and values cost 12 * layers * hidden * sequence
length for forward plus backward (PaLM, Chowdhery et al. 2022, appendix B), counted over the
whole sequence because the block mask is applied to a dense score matrix. Gradient
checkpointing's recomputation is not counted: this is model FLOPs, as MFU conventionally is.

MFU = achieved model FLOP/s / peak FLOP/s, where the peak is measured on the worker itself
(a timed matmul in the training dtype with the worker's torch threads), not a datasheet
number: on shared CPUs a datasheet peak says little.
"""

from __future__ import annotations

import json
import math
import time

from raylab.core import logs, storage


def flops_per_token(model, seq_len: int) -> dict[str, float]:
    from raylab.train.checkpoint import unwrap

    inner = unwrap(model)
    params = {id(p): p for p in inner.parameters()}
    n_all = sum(p.numel() for p in params.values())
    n_trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = base.config
    emb = base.get_input_embeddings()
    out = base.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    n = n_all - (0 if tied or emb is None else emb.weight.numel())
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    attention = 12 * layers * hidden * seq_len
    return {"params": n_all, "trainable_params": n_trainable, "matmul_params": n,
            "flops_per_token": 4 * n + 2 * n_trainable + attention}


def measure_peak_flops(device, bf16: bool, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in the training dtype on this worker (best of a few runs)."""
    import torch

    size = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def progress_line(m: dict, total_steps: int, elapsed_s: float, done_at_start: int) -> str:
    """`step 40/120 (33%) loss 2.314 val 2.401 lr 9.1e-04 | 1,204 tok/s mfu 3.1% | 0m48s, ETA 1m36s`"""
    step = m["step"]
    done = step - done_at_start
    eta = elapsed_s / done * (total_steps - step) if done > 0 else float("nan")
    val = f" val {m['val_loss']:.3f}" if m.get("val_loss") is not None and math.isfinite(m["val_loss"]) else ""
    train = f" loss {m['loss']:.3f}" if m.get("loss") is not None else ""
    if done <= 0 or not math.isfinite(m.get("tokens_per_s") or float("nan")):
        # the evaluation before the first step (or right after a resume): no rate, no ETA yet
        when = "before training" if step == 0 else "resumed here"
        return f"train: step {step}/{total_steps} ({step / total_steps:.0%}){train}{val} {when} | {logs.duration(elapsed_s)}"
    return (f"train: step {step}/{total_steps} ({step / total_steps:.0%}){train}{val} "
            f"lr {m['lr']:.1e} | {m['tokens_per_s']:,.0f} tok/s mfu {m['mfu']:.1%} | "
            f"{logs.duration(elapsed_s)}, ETA {logs.duration(eta)}")


def to_jsonl(history: list[dict]) -> str:
    return "".join(json.dumps(row, allow_nan=True) + "\n" for row in history)


def plot_loss(history: list[dict], path: str, title: str) -> None:
    """Train loss per logged step and val loss per eval, as a PNG at `path` (local path or URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = sorted({(r["step"], r["val_loss"]) for r in history if r.get("evaluated") and r.get("val_loss") is not None})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    storage.save_figure(fig, path)
    plt.close(fig)
