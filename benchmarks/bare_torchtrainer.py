"""The fixed-cost baseline: a minimal Ray Train program that reaches one optimizer step.

What a person writing Ray Train by hand would write for the same job: an embedded Ray, the
data stage's packed train split read the way raylab reads a small split (pyarrow in the
driver, handed to Ray Data as one block), a one-worker TorchTrainer whose loop loads the
model with transformers + peft (LoRA r=8 on all linear layers), takes the first batch of its
shard and makes one AdamW step; the wall-clock time after that step is written to OUT. Run
in a fresh process by benchmarks/bench_train.py:

    python benchmarks/bare_torchtrainer.py MODEL_DIR DATA_DIR OUT --threads 2
"""

from __future__ import annotations

import argparse
import json
import time


def loop(config: dict) -> None:
    import numpy as np
    import ray.train
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(config["threads"])
    model = AutoModelForCausalLM.from_pretrained(config["model"])
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    shard = ray.train.get_dataset_shard("train")
    batch = next(iter(shard.iter_batches(batch_size=8, batch_format="numpy")))
    ids = torch.from_numpy(np.stack(batch["input_ids"])).long()
    labels = torch.from_numpy(np.stack(batch["labels"])).long()
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    with open(config["out"], "w") as f:
        json.dump({"first_step": time.time()}, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(address="local")  # Ray's defaults: a dashboard, as `raylab train` starts one (its state API)
    train = ray.data.from_arrow(pq.read_table(f"{args.data}/train"))
    trainer = TorchTrainer(loop, train_loop_config={"model": args.model, "out": args.out, "threads": args.threads},
                           scaling_config=ray.train.ScalingConfig(num_workers=1), datasets={"train": train})
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    main()
