"""Train stage on a real Ray: learning, Hugging Face outputs, resume after a killed worker
and a killed driver, two workers on two nodes, and the checks made before any worker starts.

One data-stage output (a small learnable corpus) is shared by every run here; `reference`
is an uninterrupted run that the interrupted runs must reproduce exactly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (
    STEPS,
    base_config,
    callers_sigint,
    cli_here,
    kill_cli_when_ready,
    run_cli,
    with_data,
)
from manifests import fake_manifest
from raylab import config, train
from raylab.core import runs
from raylab.errors import UserError
from raylab.models import build_byte_tokenizer, fingerprint, load_for_training
from raylab.train import checkpoint


def final_weights(meta_or_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(meta_or_dir) / "adapter_model.safetensors"))


pytestmark = pytest.mark.integration


def test_loss_falls_and_outputs_are_complete(reference):
    cfg, meta = reference
    m = meta["metrics"]
    assert m["val_loss"] < m["initial_val_loss"] - 0.3, m
    assert meta["steps"] == STEPS and meta["trained_tokens"] > 0 and meta["estimated_training_flops"] > 0
    assert meta["method"] == "lora" and meta["world_size"] == 1 and meta["resumed_at_steps"] == []
    train_dir = Path(cfg.output_dir) / "train"
    final = train_dir / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", runs.TRAIN_META):
        assert (final / name).exists(), name
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}) and rows[-1]["step"] == STEPS
    assert all(r["val_loss"] is not None for r in rows)  # every report carries val_loss
    trained = [r for r in rows if r["step"] > 0]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["lr"] >= 0 and r["grad_norm"] >= 0 for r in trained)
    assert trained[-1]["loss"] < trained[0]["loss"]
    assert (train_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    checkpoints = sorted(train_dir.glob("checkpoint_*"))
    assert 1 <= len(checkpoints) <= cfg.train.keep_checkpoints + 1
    assert meta["best_checkpoint"] and Path(meta["best_checkpoint"]).exists()


def test_the_run_records_the_train_stage_as_events(reference):
    from raylab.core import events, runs

    cfg, _ = reference
    recorded = [e for e in events.read(runs.Run(cfg.output_dir).events)
                if e["kind"].startswith("stage.") and e["fields"].get("stage") == "train"]
    # the reference run's own pair comes first (later tests rerun the stage in this directory)
    assert [e["kind"] for e in recorded[:2]] == ["stage.start", "stage.end"], recorded
    assert all(e["run"] == cfg.output_dir for e in recorded)


def test_saved_adapter_loads_with_plain_peft_and_matches(reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, meta = reference
    final = Path(cfg.output_dir) / "train" / "final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == meta["base_model_path"] and os.path.isdir(meta["base_model_path"])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"]), final).eval()
    ours = load_for_training(cfg.model)
    checkpoint.load_model_weights(ours, str(final))
    ours.eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and fingerprint(tok)["fingerprint"] == json.loads(
        (Path(cfg.output_dir) / "data" / "manifest.json").read_text())["tokenizer"]["fingerprint"]
    ids = torch.tensor([tok("Ticket 7: the blue widget")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_export_merge_gives_the_same_model(reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylab.models import export

    cfg, meta = reference
    merged_dir = export(cfg.output_dir, str(tmp_path / "merged"), merge=True)
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    final = Path(cfg.output_dir) / "train" / "final"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(meta["base_model_path"]), final).eval()
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert cli_here("export", str(tmp_path / "nothing"), str(tmp_path / "out")).returncode == 2


def test_rerun_skips_a_finished_run_and_refuses_changed_settings(reference):
    cfg, meta = reference
    again = train.run_train(cfg)
    assert again["created"] == meta["created"]  # nothing trained
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-4})})
    with pytest.raises(UserError, match=r"train\.lr.*train\.resume=false"):
        train.run_train(changed)


def _past_first_checkpoint(train_dir: Path) -> bool:
    """A checkpoint counts once Ray Train's controller has registered it in its snapshot
    (the directory appears while it is still being written, and a report reaches the
    controller only when it next polls the workers)."""
    try:
        snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def _kill_a_worker_after_first_checkpoint(train_dir: Path, done: threading.Event, killed: list) -> None:
    from ray.util.state import list_actors

    while not done.is_set():
        if _past_first_checkpoint(train_dir):
            workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
                return
        time.sleep(0.2)


def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted(learn_data, reference, tmp_path):
    cfg = with_data(learn_data, tmp_path / "killed-worker", max_failures=1, checkpoint_every=6)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(Path(cfg.output_dir) / "train", done, killed), daemon=True)
    killer.start()
    try:
        meta = train.run_train(cfg)
    finally:
        done.set()
    assert killed, "the worker was never killed"
    assert meta["steps"] == STEPS and meta["resumed_at_steps"] and meta["resumed_at_steps"][0] >= 6
    ref_weights = final_weights(Path(reference[0].output_dir) / "train" / "final")
    for name, tensor in final_weights(Path(cfg.output_dir) / "train" / "final").items():
        # float32 rounding: a resumed run has matched to ~1e-6 (1.07e-6 in one CI run, losses equal to
        # 6 decimals); a wrong data position or lost optimizer state moves them far more.
        torch.testing.assert_close(tensor, ref_weights[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_killed_driver_rerun_resumes(learn_data, reference, tmp_path):
    cfg = with_data(learn_data, tmp_path / "killed-driver", checkpoint_every=6)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    train_dir = Path(cfg.output_dir) / "train"
    kill_cli_when_ready(["train", str(path)], lambda: _past_first_checkpoint(train_dir), timeout_s=240)
    assert not (train_dir / "final").exists()
    meta = train.run_train(config.load(path))
    assert meta["steps"] == STEPS and meta["resumed_at_steps"] and meta["resumed_at_steps"][0] >= 6
    ref_weights = final_weights(Path(reference[0].output_dir) / "train" / "final")
    for name, tensor in final_weights(train_dir / "final").items():
        # float32 rounding: a resumed run has matched to ~1e-6 (1.07e-6 in one CI run, losses equal to
        # 6 decimals); a wrong data position or lost optimizer state moves them far more.
        torch.testing.assert_close(tensor, ref_weights[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.multinode
def test_two_workers_on_two_nodes_end_identical(learn_data, two_node_cluster, tmp_path):
    cfg = with_data(learn_data, tmp_path / "two-nodes", num_workers=2, cpus_per_worker=1,
                    placement_strategy="STRICT_SPREAD", gradient_checkpointing=True, max_steps=6, eval_every=3)
    meta = train.run_train(cfg, address=two_node_cluster.address)
    assert meta["world_size"] == 2 and meta["steps"] == 6
    assert len(meta["worker_nodes"]) == 2 and len(set(meta["worker_nodes"])) == 2  # one worker per node
    assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1
    assert meta["metrics"]["val_loss"] < meta["metrics"]["initial_val_loss"]
    # every held-out sequence counted once whatever the world size (Ray's equal split drops rows)
    assert meta["metrics"]["initial_val_loss"] == pytest.approx(_full_val_loss(cfg), rel=1e-5)


def _full_val_loss(cfg) -> float:
    """The untrained model's loss over every val sequence, in this process (LoRA starts as
    the identity, so it is the base model's)."""
    import pyarrow.parquet as pq
    import torch

    from raylab.models import load_model
    from raylab.train import loss

    model = load_model(cfg.model).eval()
    table = pq.read_table(Path(cfg.output_dir) / "data" / "val")
    batch = {k: torch.tensor(table[k].to_pylist()) for k in ("input_ids", "labels", "segment_ids", "position_ids")}
    with torch.inference_mode():
        sums = loss.forward_sums(model, batch, loss.attn_impl_of(model), accuracy=False)
    return float(sums.loss) / sums.targets


# ---------------------------------------------------------------- checks before any worker starts


def _manifest(tok, seq_len=128, rows=10) -> runs.DataManifest:
    return runs.DataManifest.model_validate(fake_manifest(fingerprint(tok), seq_len=seq_len, rows=rows, val_rows=2))


def _save(path: Path, model_type: str, tok, **kw) -> Path:
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **kw)
    AutoModel.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cfg(tmp_path, name_or_path, **model):
    raw = base_config(tmp_path / "run", tmp_path / "x.jsonl")
    raw["model"] = {"name_or_path": str(name_or_path), **model}
    return config.load_dict(raw)


@pytest.mark.parametrize("case", ["not_causal", "target_modules", "positions", "qlora", "tokenizer", "workers", "objective"])
def test_preflight_names_the_problem(case, tmp_path, tiny_model_dir):
    tok = build_byte_tokenizer()
    manifest = _manifest(tok)
    if case == "not_causal":
        cfg = _cfg(tmp_path, _save(tmp_path / "t5", "t5", tok, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
        expect = r"is a .*t5.*not a causal language model"
    elif case == "target_modules":
        cfg = _cfg(tmp_path, tiny_model_dir, lora={"target_modules": ["q_proj", "nope_proj"]})
        expect = r"model\.lora\.target_modules: the model has no module named \['nope_proj'\]"
    elif case == "positions":
        manifest = _manifest(tok, seq_len=2048)
        cfg = _cfg(tmp_path, tiny_model_dir)
        cfg.data.max_seq_len = 2048
        expect = r"data\.max_seq_len=2048 is beyond the model's 1024 positions"
    elif case == "qlora":
        cfg = _cfg(tmp_path, tiny_model_dir, method="qlora")
        expect = r"qlora .*needs a GPU"
    elif case == "tokenizer":
        other = build_byte_tokenizer()
        other.add_tokens(["<|extra|>"])
        manifest = _manifest(other)
        cfg = _cfg(tmp_path, tiny_model_dir)
        expect = r"tokenized with a different tokenizer.*vocab_size 261 vs 260.*rerun `raylab data`"
    elif case == "workers":
        manifest = _manifest(tok, rows=1)
        cfg = _cfg(tmp_path, tiny_model_dir)
        cfg.train.num_workers = 2
        expect = r"fewer than train\.num_workers=2"
    else:
        cfg = _cfg(tmp_path, tiny_model_dir)
        cfg.train.objective = "nope"
        expect = r"train\.objective='nope' is not a known objective; expected one of cross_entropy"
    with pytest.raises(UserError, match=expect):
        train.preflight(cfg, manifest)


def test_cli_train_user_errors_exit_2_without_traceback(tmp_path, tiny_model_dir):
    raw = base_config(tmp_path / "run", tmp_path / "x.jsonl")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    # In this process (conftest.cli_here): `python -m raylab train` is the killed-driver and max-failures tests'
    r = cli_here("train", str(path))
    assert r.returncode == 2 and "run `raylab data" in r.stderr and "Traceback" not in r.stderr
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps(fake_manifest(fingerprint(build_byte_tokenizer()), seq_len=128, rows=10, val_rows=2)))
    r = cli_here("train", str(path), "model.method=qlora", f"model.name_or_path={tiny_model_dir}")
    assert r.returncode == 2 and "needs a GPU" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- checkpoint integrity on resume


def _resumable_copy(reference, dst: Path):
    """A copy of the finished reference run without its final metadata, so training it again
    resumes from Ray Train's latest checkpoint; returns (config, {step: checkpoint dir})."""
    import shutil

    ref_cfg, _ = reference
    shutil.copytree(ref_cfg.output_dir, dst)
    cfg = config.load_dict(base_config(dst, Path(ref_cfg.data.sources[0].path)))
    Path(runs.Run(cfg.output_dir).train_meta).unlink()
    by_step = {checkpoint.read_state(str(d))["step"]: d for d in (dst / "train").glob("checkpoint_*") if d.is_dir()}
    assert sorted(by_step) == [12, STEPS], by_step  # eval_every=12: one checkpoint per evaluation
    return cfg, by_step


def _max_difference(final_dir: Path, reference) -> float:
    ref = final_weights(Path(reference[0].output_dir) / "train" / "final")
    return max((t - ref[name]).abs().max().item() for name, t in final_weights(final_dir).items())


def _alive_controllers() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])}


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_good_one(reference, tmp_path):
    from raylab.core import events

    cfg, by_step = _resumable_copy(reference, tmp_path / "corrupted")
    weights = by_step[STEPS] / "model" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight of the latest checkpoint
    weights.write_bytes(bytes(data))
    controllers = _alive_controllers()
    with callers_sigint() as mine:
        meta = train.run_train(cfg)
        # Ray Train's fit() installs its own SIGINT handler in the main thread; the caller's is back
        assert signal.getsignal(signal.SIGINT) is mine
        # That handler held the run's controller: while it stayed installed, the TrainController
        # actor of every in-process run stayed alive. Released, the actor ends (asynchronously).
        # Checked before this test puts its own handler back, which would release it too.
        deadline = time.monotonic() + 60
        while _alive_controllers() - controllers and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_controllers() - controllers
    assert meta["steps"] == STEPS and meta["resumed_at_steps"] == [12]  # from the previous good checkpoint
    (rejected,) = [e for e in events.read(runs.Run(cfg.output_dir).events) if e["kind"] == "train.checkpoint_rejected"]
    assert rejected["fields"]["checkpoint"].endswith(by_step[STEPS].name) and rejected["fields"]["resumed_step"] == 12
    assert rejected["fields"]["resumed_from"].endswith(by_step[12].name)
    assert rejected["fields"]["problems"][0].startswith("model/adapter_model.safetensors has sha256")
    # steps 13-24 trained again from the good checkpoint reproduce the uninterrupted run
    assert _max_difference(Path(cfg.output_dir) / "train" / "final", reference) <= 1e-5


def test_resuming_from_the_wrong_step_exceeds_the_resume_tolerance(reference, tmp_path):
    """The negative control of the resume tests' 1e-5: the step-12 checkpoint relabelled as
    step 11 (its data position one step back, its manifest rewritten so it verifies) resumes
    one step off, and the final weights land far outside the tolerance."""
    cfg, by_step = _resumable_copy(reference, tmp_path / "wrong-step")
    (by_step[STEPS] / "manifest_rank0.json").unlink()  # the latest is incomplete: resume from step 12
    good = by_step[12]
    state = checkpoint.read_state(str(good))
    state["step"] -= 1
    state["batches_in_epoch"] = max(0, state["batches_in_epoch"] - cfg.train.grad_accum)
    (good / "state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(str(good), rank=0, world_size=1)
    meta = train.run_train(cfg)
    assert meta["steps"] == STEPS and meta["resumed_at_steps"] == [11]
    assert _max_difference(Path(cfg.output_dir) / "train" / "final", reference) > 10 * 1e-5


# ---------------------------------------------------------------- the paths a large corpus or a failing worker takes


def test_a_split_over_the_thresholds_streams_through_ray_data(learn_data, reference, tmp_path, monkeypatch):
    """Every size threshold lowered to 0 (their environment settings): both splits are read by
    Ray Data tasks, never materialized, and streamed into the workers on every pass."""
    for name in ("DRIVER_READ_BYTES", "MATERIALIZE_BYTES", "TRAIN_CACHE_BYTES", "VAL_CACHE_BYTES"):
        monkeypatch.setenv(f"RAYLAB_{name}", "0")
    cfg = with_data(learn_data, tmp_path / "streamed", max_steps=8, eval_every=8)
    meta = train.run_train(cfg)
    assert meta["ingest"] == {"train_read": "streamed", "val_read": "streamed", "train_in_worker": "streamed",
                              "val_in_worker": "streamed"}
    assert meta["steps"] == 8 and meta["metrics"]["val_loss"] < meta["metrics"]["initial_val_loss"]
    # the control: the small corpus at the default thresholds takes the in-memory paths
    assert reference[1]["ingest"] == {"train_read": "driver", "val_read": "driver", "train_in_worker": "cached",
                                      "val_in_worker": "cached"}


def _kill_workers_after_each_baseline(train_dir: Path, done: threading.Event, killed: list, times: int) -> None:
    """SIGKILL a Ray Train worker each time a (re)started worker group has written its step-0
    evaluation to metrics.jsonl, noting whether a checkpoint existed then."""
    from ray.util.state import list_actors

    metrics, seen = train_dir / "metrics.jsonl", None
    while not done.is_set() and len(killed) < times:
        try:
            stamp = metrics.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp is not None and stamp != seen:
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                checkpointed = _past_first_checkpoint(train_dir)
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append((workers[0].pid, checkpointed))
                seen = stamp
        time.sleep(0.2)


def test_a_worker_killed_before_the_first_checkpoint_restarts_from_step_0(learn_data, reference, tmp_path):
    cfg = with_data(learn_data, tmp_path / "killed-early", max_failures=1)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_workers_after_each_baseline,
                              args=(Path(cfg.output_dir) / "train", done, killed, 1), daemon=True)
    killer.start()
    try:
        meta = train.run_train(cfg)
    finally:
        done.set()
    assert [checkpointed for _, checkpointed in killed] == [False], killed  # killed once, before any checkpoint
    assert meta["steps"] == STEPS and meta["resumed_at_steps"] == []  # nothing to resume: a fresh start
    assert _max_difference(Path(cfg.output_dir) / "train" / "final", reference) <= 1e-5


def test_max_failures_exhausted_exits_1_with_the_workers_error(learn_data, tmp_path):
    import ray

    cfg = with_data(learn_data, tmp_path / "exhausted", max_failures=1)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_workers_after_each_baseline,
                              args=(Path(cfg.output_dir) / "train", done, killed, 2), daemon=True)
    killer.start()
    try:
        out = run_cli("train", str(path), "--address", ray.get_runtime_context().gcs_address)
    finally:
        done.set()
    assert len(killed) == 2, killed  # the first failure was restarted (max_failures=1), the second was not
    assert out.returncode == 1, out.stderr[-3000:]
    # the worker's error, said plainly: no traceback, and not called a bug (a killed worker is not one)
    assert "raylab train: failed: training failed: a worker died" in out.stderr, out.stderr[-3000:]
    assert "max_failures=1" in out.stderr and "died" in out.stderr.split("spent:", 1)[1], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "a bug" not in out.stderr, out.stderr[-3000:]
    assert not (Path(cfg.output_dir) / "train" / "final").exists()
