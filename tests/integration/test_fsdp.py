"""`train.strategy: fsdp` (raylab/train/sharding.py) on CPU: two gloo processes, then Ray Train.

    PYTHONPATH=. python -m pytest -q -m "integration or not integration" tests/integration/test_fsdp.py

`test_fsdp_on_two_gloo_processes` drives raylab's own pieces (sharding, loss.train_step,
checkpoint.save/restore) in two plain torch processes, no Ray: DDP and FSDP give the same
losses and weights; a checkpoint saved under FSDP holds full tensors in peft / Hugging Face
format and resumes with the same optimizer state; evaluation with unequal batch counts per
worker does not hang. `test_fsdp_lora_run_on_ray_train_resumes` is the whole train stage
with two FSDP workers, and a rerun resumed from its first checkpoint. GPU: the same code on
NCCL is not run here (no GPU was lent when this was written).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

SEQ = 16


def _batch(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """A packed micro-batch as loss.collate makes it: one document per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(SEQ).repeat(rows, 1),
            "segment_ids": torch.ones(rows, SEQ, dtype=torch.long), "num_tokens": torch.full((rows,), SEQ)}


def _model(method: str, activation_checkpointing: bool = False, dtype: str = "float32"):
    from raylab.config.model import ModelConfig
    from raylab.models import enable_activation_checkpointing, load_for_training
    from raylab.train import checkpoint

    lora = {"dropout": 0.0} | ({"modules_to_save": ["embed_tokens"]} if method == "hybrid" else {})
    cfg = ModelConfig.model_validate({"name_or_path": "preset:tiny-llama", "method": method, "lora": lora})
    checkpoint.seed_all(0)  # identical initial adapters on both ranks, as the loop seeds them
    model = load_for_training(cfg, torch.device("cpu"), dtype)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def _trainer(model, lr: float = 1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def _steps(model, optimizer, scheduler, rank: int, steps: range) -> list[float]:
    """Optimizer steps of two micro-batches each (gradient sync on the last only); each rank its own data."""
    from raylab.train import loss

    out = []
    for s in steps:
        window = [_batch(1000 * s + 10 * rank + i) for i in range(2)]
        out.append(loss.train_step(model, optimizer, window, device=torch.device("cpu"), world_size=2, attn_impl="eager",
                                   max_grad_norm=1.0)["loss"])
        scheduler.step()
    return out


def _trainable_full(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter as a full tensor (gathered from the shards on every rank)."""
    from raylab.train import sharding

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: (p.full_tensor() if sharding.is_sharded(model) else p).detach().clone()
            for n, p in model.named_parameters() if n in names}


def _worker(rank: int, out: str) -> None:
    import torch.distributed as dist
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylab.models import resolve
    from raylab.train import checkpoint, loss, sharding

    torch.set_num_threads(1)
    # A file rendezvous, not a TCP port picked free in the parent, which stays unbound for the
    # seconds of imports before rank 0 listens on it.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    report: dict = {}
    cpu = torch.device("cpu")
    base_path = resolve("preset:tiny-llama")

    # DDP and FSDP: same start, same data -> same losses and weights (LoRA, 4 steps).
    ddp = torch.nn.parallel.DistributedDataParallel(_model("lora"))
    ddp_opt, ddp_sched = _trainer(ddp)
    ddp_losses = _steps(ddp, ddp_opt, ddp_sched, rank, range(4))
    fsdp = sharding.shard(_model("lora"), cpu)
    opt, sched = _trainer(fsdp)
    first = _steps(fsdp, opt, sched, rank, range(2))
    ckpt = Path(out) / f"ckpt_rank{rank}"
    checkpoint.save(str(ckpt), rank=rank, model=fsdp, optimizer=opt, scheduler=sched,
                    state={"step": 2, "world_size": 2, "strategy": "fsdp"})
    gathered = sharding.full_state_dict(fsdp)  # what the checkpoint was written from ({} on rank 1)
    fsdp_losses = first + _steps(fsdp, opt, sched, rank, range(2, 4))
    report["ddp_losses"], report["fsdp_losses"] = ddp_losses, fsdp_losses
    ddp_w, fsdp_w = _trainable_full(ddp.module), _trainable_full(fsdp)
    report["ddp_fsdp_max_diff"] = max((ddp_w[n] - fsdp_w[n]).abs().max().item() for n in ddp_w)
    report["weights_moved"] = max(((fsdp_w[n] - gathered[n]).abs().max().item() for n in fsdp_w if n in gathered), default=0.0)

    # Resume: rank 1's rng file beside rank 0's files, as Ray Train merges a checkpoint.
    dist.barrier()
    merged = Path(out) / "ckpt"
    if rank == 0:
        shutil.copytree(Path(out) / "ckpt_rank0", merged)
        shutil.copy(Path(out) / "ckpt_rank1" / "rng_rank1.pt", merged)
    dist.barrier()
    resumed = _model("lora")
    checkpoint.restore_weights(str(merged), resumed)
    sharding.shard(resumed, cpu)
    r_opt, r_sched = _trainer(resumed)
    state = checkpoint.restore(str(merged), rank=rank, world_size=2, model=resumed, optimizer=r_opt, scheduler=r_sched, seed=0)
    report["resumed_step"] = state["step"]
    report["resumed_losses"] = _steps(resumed, r_opt, r_sched, rank, range(2, 4))
    r_w = _trainable_full(resumed)
    report["resume_max_diff"] = max((r_w[n] - fsdp_w[n]).abs().max().item() for n in fsdp_w)
    # negative control: the same weights without the optimizer's state end elsewhere
    fresh = _model("lora")
    checkpoint.restore_weights(str(merged), fresh)
    sharding.shard(fresh, cpu)
    f_opt, f_sched = _trainer(fresh)
    _steps(fresh, f_opt, f_sched, rank, range(2, 4))
    f_w = _trainable_full(fresh)
    report["no_optimizer_state_max_diff"] = max((f_w[n] - fsdp_w[n]).abs().max().item() for n in fsdp_w)

    # Evaluation with 2 batches on rank 0 and 1 on rank 1: lockstep, no hang; the same as DDP's.
    batches = [_batch(5000 + rank * 10 + i) for i in range(2 - rank)]
    report["val_fsdp"] = loss.evaluate(fsdp, iter(batches), device=cpu, attn_impl="eager", lockstep=True)["val_loss"]
    report["val_ddp"] = loss.evaluate(ddp.module, iter(batches), device=cpu, attn_impl="eager")["val_loss"]

    # Full and hybrid (with activation checkpointing): one step, saved, loaded back.
    saved = {}
    for method in ("full", "hybrid"):
        model = sharding.shard(_model(method, activation_checkpointing=method == "hybrid"), cpu)
        m_opt, m_sched = _trainer(model, lr=1e-3)
        report[f"{method}_loss"] = _steps(model, m_opt, m_sched, rank, range(1))[0]
        full = sharding.full_state_dict(model)
        if rank == 0:
            path = Path(out) / method
            checkpoint.save_model(model, str(path), full)
            saved[method] = (path, full)
        dist.barrier()
    # What a GPU run gets by default (model.dtype: auto): a bf16 base with float32 adapters in one unit.
    mixed = sharding.shard(_model("lora", dtype="bfloat16"), cpu)
    report["mixed_dtypes"] = sorted({str(sharding.local_tensor(p).dtype) for p in mixed.parameters()})
    m_opt, m_sched = _trainer(mixed)
    report["mixed_losses"] = _steps(mixed, m_opt, m_sched, rank, range(2))

    # negative control of the shape check: this rank's shards passed off as the model
    try:
        sharding.check_full(sharding.model_shapes(fsdp), {k: sharding.local_tensor(v) for k, v in fsdp.state_dict().items()})
        report["shard_check"] = "passed"
    except RuntimeError as e:
        report["shard_check"] = str(e)
    if rank == 0:
        # the LoRA adapter as saved at step 2 loads with plain peft and equals the gathered weights
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), ckpt / checkpoint.MODEL_DIR)
        lora_params = {n: p for n, p in adapter.named_parameters() if "lora_" in n}
        report["adapter_tensors"] = len(lora_params)
        report["adapter_max_diff"] = max((p - gathered[n]).abs().max().item() for n, p in lora_params.items())
        path, full = saved["full"]
        loaded = AutoModelForCausalLM.from_pretrained(path)
        report["full_architectures"] = json.loads((path / "config.json").read_text())["architectures"]
        report["full_max_diff"] = max((t - full[n]).abs().max().item() for n, t in loaded.state_dict().items())
        path, full = saved["hybrid"]
        hybrid = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), path)
        trained = {n: p for n, p in hybrid.named_parameters() if "lora_" in n or "modules_to_save" in n}
        report["hybrid_tensors"] = sorted(trained)
        report["hybrid_max_diff"] = max((p - full[n]).abs().max().item() for n, p in trained.items())
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_fsdp_on_two_gloo_processes(tmp_path):
    from raylab.models import materialize_preset

    materialize_preset("tiny-llama")  # once, before two processes would race to write it
    ctx = mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 600  # a collective that one rank never joins would hang forever
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo processes did not finish (a collective some rank never joined?)")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # DDP vs FSDP: the same global loss every step, and the same weights (float32 reduction order)
    assert r0["fsdp_losses"] == pytest.approx(r0["ddp_losses"], rel=1e-5) and r0["fsdp_losses"] == r1["fsdp_losses"]
    assert r0["fsdp_losses"][-1] < r0["fsdp_losses"][0]
    assert r0["ddp_fsdp_max_diff"] < 1e-5 and r0["weights_moved"] > 1e-3, r0
    # resume: the same steps 3-4 and weights as the uninterrupted run; without the optimizer state, not
    assert r0["resumed_step"] == 2 and r0["resumed_losses"] == pytest.approx(r0["fsdp_losses"][2:], rel=1e-6)
    assert r0["resume_max_diff"] < 1e-6 < 1e-4 < r0["no_optimizer_state_max_diff"], r0
    assert r0["val_fsdp"] == pytest.approx(r0["val_ddp"], rel=1e-5) and r0["val_fsdp"] == r1["val_fsdp"]
    # saved files are the full model in the formats DDP writes
    assert r0["adapter_tensors"] > 0 and r0["adapter_max_diff"] == 0.0
    assert r0["full_architectures"] == ["LlamaForCausalLM"] and r0["full_max_diff"] == 0.0
    hybrid = r0["hybrid_tensors"]
    assert any("embed_tokens.modules_to_save" in n for n in hybrid) and any("lora_A" in n for n in hybrid), hybrid
    assert r0["hybrid_max_diff"] == 0.0
    assert "does not match the model" in r0["shard_check"], r0["shard_check"]
    assert r0["mixed_dtypes"] == ["torch.bfloat16", "torch.float32"] and all(map(math.isfinite, r0["mixed_losses"])), r0


def test_fsdp_lora_run_on_ray_train_resumes(learn_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import base_config, with_data
    from raylab import config, train
    from raylab.core import runs
    from raylab.train import checkpoint

    settings = {"num_workers": 2, "strategy": "fsdp", "activation_checkpointing": True, "max_steps": 4, "eval_every": 2}
    cfg = with_data(learn_data, tmp_path / "fsdp", **settings)
    meta = train.run_train(cfg)
    m = meta["metrics"]
    assert meta["world_size"] == 2 and meta["steps"] == 4 and m["val_loss"] < m["initial_val_loss"], m
    final = Path(cfg.output_dir) / "train" / "final"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(meta["base_model_path"]), final)
    assert any("lora_A" in n for n, _ in adapter.named_parameters())
    ckpts = {checkpoint.read_state(str(d))["step"]: d for d in (Path(cfg.output_dir) / "train").glob("checkpoint_*") if d.is_dir()}
    assert sorted(ckpts) == [2, 4] and checkpoint.read_state(str(ckpts[4]))["strategy"] == "fsdp"
    # Resume from step 2: a copy without its final metadata and with the step-4 checkpoint incomplete.
    copy = tmp_path / "resumed"
    shutil.copytree(cfg.output_dir, copy)
    Path(runs.Run(str(copy)).train_meta).unlink()
    (copy / "train" / ckpts[4].name / "manifest_rank0.json").unlink()
    resumed = train.run_train(config.load_dict(base_config(copy, Path(cfg.data.sources[0].path), **settings)))
    assert resumed["resumed_at_steps"] == [2] and resumed["steps"] == 4
    ours, ref = load_file(str(copy / "train" / "final" / "adapter_model.safetensors")), load_file(str(final / "adapter_model.safetensors"))
    at_2 = load_file(str(ckpts[2] / checkpoint.MODEL_DIR / "adapter_model.safetensors"))
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    assert max((at_2[k] - ref[k]).abs().max().item() for k in ref) > 1e-4  # steps 3-4 did move the weights
