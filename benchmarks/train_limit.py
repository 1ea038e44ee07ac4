"""The limit for raylab's training throughput: raylab's own training step, no Ray.

Run in a fresh process by benchmarks/bench_train.py. It builds what a raylab train worker
builds (the same config, `models.load_for_training`, objective, AdamW, LR schedule, seed) and
feeds `train.loss.train_step` the same pre-collated batches in the same order as a worker
with a cached shard (`train.loop.Shards.train_batches`: the split read whole, a seeded
permutation per epoch), then writes the wall-clock time after every step:

    python benchmarks/train_limit.py CONFIG.json DATA_DIR OUT.json --threads 2 [--dynamic-padding]

`--dynamic-padding` trims each batch of a `data.packing: pad` split to its longest row (pad
to the batch's longest, as a padding collator does) instead of the split's fixed length.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

STARTED = time.time()


def batches(table, t, epoch: int, dynamic_padding: bool):
    """Shards.train_batches over a cached shard: the same rows, the same permutation."""
    import torch

    from raylab.train.loop import collate

    cols = collate({k: table[k].to_numpy(zero_copy_only=False) for k in table.column_names}, t.loss_on == "all")
    n = len(next(iter(cols.values())))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed + epoch))
    for i in range(0, n, t.batch_size):
        batch = {k: v[order[i:i + t.batch_size]] for k, v in cols.items()}
        if dynamic_padding:  # right padding: a row's real tokens come first
            longest = int(batch["num_tokens"].max())
            batch = {k: (v[:, :longest] if v.dim() == 2 else v) for k, v in batch.items()}
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--dynamic-padding", action="store_true")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from raylab.config import RaylabConfig
    from raylab.models import load_for_training
    from raylab.train import checkpoint, loss, objectives
    from raylab.train.loop import plan_steps

    torch.set_num_threads(args.threads)
    cfg = RaylabConfig.model_validate(json.loads(Path(args.config).read_text()))
    t, device = cfg.train, torch.device("cpu")
    table = pq.read_table(Path(args.data) / "train")  # files in sorted order, as the driver reads a small split
    steps = plan_steps(table.num_rows, 1, t.batch_size, t.grad_accum, t.epochs, t.max_steps)
    checkpoint.seed_all(t.seed)
    model = load_for_training(cfg.model, device)
    model.train()
    objective = objectives.build(objectives.resolve(t.objective), model, cfg,
                                 objectives.WorkerContext(rank=0, world_size=1, device=device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    warmup = int(t.warmup_ratio * steps.total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loss.lr_factor(s, steps.total, warmup, t.schedule))
    attn_impl = loss.attn_impl_of(model)
    ready = time.time()
    rows, step, epoch = [], 0, 0
    while step < steps.total and epoch < steps.epochs:
        it = batches(table, t, epoch, args.dynamic_padding)
        while step < steps.total:
            window = list(itertools.islice(it, t.grad_accum))
            if not window:
                break
            out = loss.train_step(model, optimizer, window, device=device, world_size=1, attn_impl=attn_impl,
                                  max_grad_norm=t.max_grad_norm, objective=objective)
            scheduler.step()
            step += 1
            rows.append({"step": step, "time": time.time(), "real_tokens": out["real_tokens"], "loss": out["loss"]})
        epoch += 1
    Path(args.out).write_text(json.dumps({"started": STARTED, "ready": ready, "threads": torch.get_num_threads(),
                                          "steps": rows}))


if __name__ == "__main__":
    main()
