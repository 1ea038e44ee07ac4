"""The vLLM engine behind the serving seam (engine.Engine), through vLLM's public async API.

    engine = VllmEngine("/path/to/base", VllmSettings(dtype="float32", kv_cache_gb=1))
    async for out in engine.submit(Request("r1", prompt_ids, Sampling(max_tokens=32), adapter="a1")):
        print(out.text, out.finish_reason)
    await engine.load_adapter("a1", "/verified/local/copy")   # a LoRARequest from then on
    engine.shutdown()                                          # its engine-core process ends

One `AsyncLLM` per model directory (one per replica for a base and its adapters; a full model
version gets its own). vLLM does the batching, paged attention, multi-LoRA kernels and
detokenization; raylab keeps what surrounds it: which registry versions are loaded (the
Generator's LRU and pins), their checksums (the paths here are the verified local copies),
and the OpenAI surface. Requests come as token ids rendered with the version's own chat
template, so vLLM's tokenizer is used only to turn ids back into text; `auto` (generator.py)
sends a version here only when its tokenizer's vocabulary is the base's.

What vLLM refuses (DoRA, modules_to_save, LoRA bias, ranks outside its list) is checked up
front by `lora_problems`, so the Generator serves such versions with the transformers engine
instead of failing at request time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from raylab.core import runs, storage
from raylab.serve.engine import ABORT, Engine, Output, Request, RequestRejected

# vLLM logs every start and shutdown step at INFO, which Ray forwards from the replica to the
# driver's console (`raylab run` shows only its own progress: issue 20); warnings still show, and
# an operator can set VLLM_LOGGING_LEVEL=INFO. Set before any vLLM import in this process (the
# engine-core process inherits it).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

log = logging.getLogger("ray.serve")

# vLLM's LoRA kernels take these ranks only (vllm/config/lora.py's possible_max_ranks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# its CPU attention's head sizes (the CPU attention backend's supported list)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class VllmSettings:
    """The engine's arguments from serve.vllm (config) and the replica's resources."""

    dtype: str = "auto"
    max_model_len: int | None = None
    max_loras: int = 4  # adapters in one batch
    max_cpu_loras: int = 8  # adapters kept loaded (its LRU; raylab's own LRU decides what is loaded)
    max_lora_rank: int = 64
    max_num_seqs: int = 64
    kv_cache_gb: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    threads: int | None = None  # CPU: the replica's CPUs (vLLM gets omp_threads(threads) OpenMP threads)


def omp_threads(cpus: int) -> int:
    """vLLM's OpenMP threads on CPU for a replica of `cpus` CPUs: one fewer, at least one.

    Why not all of them: besides the OpenMP team, the replica runs vLLM's engine core (its
    scheduler loop, which polls its shared-memory queue between steps) and its own asyncio
    loop, and Serve's proxy and ingress run beside it. With as many OpenMP threads as CPUs they
    all preempt the team, and an OpenMP step waits for its slowest thread, so every step pays
    for each preemption. vLLM's own CPU binding reserves a core per rank for its scheduler for
    the same reason (vllm/utils/ompmultiprocessing.py). On 2 CPUs, benchmarks/bench_serve_vllm.py
    measured 398 against 164 tokens/s at one stream and 1,085 against 897 at 16 (1 thread at
    abc2262 against 2 at 416784d, results/serve_vllm.json).
    """
    return max(1, int(cpus) - 1)


def cpu_environment(s: VllmSettings, current: Mapping[str, str]) -> dict[str, str]:
    """The variables a CPU engine starts under: its KV cache size, and its OpenMP threads
    unbound (Ray places the replica; vLLM's `auto` binding would pin cores other replicas
    use). OMP_NUM_THREADS is set, not defaulted: Ray sets it in every worker to the actor's
    CPUs, so a default would never apply. An operator's VLLM_CPU_OMP_THREADS_BIND (a core
    list, set where the Ray node starts) is kept, and then vLLM sets the thread count from it."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(s.kv_cache_gb)))}
    if s.threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = current.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env["OMP_NUM_THREADS"] = str(omp_threads(s.threads))
    return env


def available() -> str | None:
    """None when vLLM imports here, else why not (the `auto` choice's log line)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # an ImportError, or a CUDA-built torchvision against a CPU torch
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None


def engine_report(cfg) -> list[str]:
    """`raylab doctor`'s lines on the serving engine serve.engine chooses for the config's model
    on this machine (a cluster's nodes choose for themselves, with what they have installed)."""
    if cfg.serve.engine == "transformers":
        return ["serving engine: transformers (serve.engine)"]
    from importlib import metadata

    from raylab import models

    # the model first, as the Generator decides: importing vLLM costs seconds, needless for a
    # model it cannot run anyway
    try:
        problems = model_dir_problems(models.resolve(cfg.model.name_or_path))
    except Exception as e:  # a hub id with no hub: the model line above says more
        problems = [f"cannot read the model: {e}"]
    why = available() if not problems or cfg.serve.engine == "vllm" else None
    if why is not None:
        if cfg.serve.engine == "vllm":
            return [f"serving engine: PROBLEM serve.engine is vllm but vLLM does not import ({why}); "
                    "install it with scripts/install.sh or set serve.engine: auto"]
        return [f"serving engine: transformers (serve.engine auto; vLLM does not import: {why})"]
    if problems:
        return [f"serving engine: transformers for {cfg.model.name_or_path} (vLLM cannot run it: {'; '.join(problems)})"]
    return [f"serving engine: vllm {metadata.version('vllm') if _installed('vllm') else metadata.version('vllm-cpu')} "
            "(lora adapters of rank " + "/".join(map(str, VLLM_LORA_RANKS)) + " and full models; DoRA, hybrid and other "
            "ranks on the transformers engine)"]


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def lora_problems(adapter_dir: str) -> list[str]:
    """Why vLLM cannot serve this peft adapter (empty: it can), from its adapter_config.json."""
    try:
        with storage.plain_dir(adapter_dir) as src, open(os.path.join(src, runs.ADAPTER_CONFIG)) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        return [f"unreadable adapter_config.json: {e}"]
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (method hybrid)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}")
    if cfg.get("r") not in VLLM_LORA_RANKS:
        problems.append(f"rank {cfg.get('r')} (vLLM takes {', '.join(map(str, VLLM_LORA_RANKS))})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module ranks (rank_pattern/alpha_pattern)")
    return problems


def model_dir_problems(model_dir: str) -> list[str]:
    """Why vLLM cannot run the model saved in this directory here (empty: it can)."""
    import torch
    from transformers import AutoConfig

    if storage.sealed_files(model_dir):
        # transformers opens it in memory (storage.plain_dir); vLLM's engine core, another
        # process, would need a plaintext copy for its whole life
        return ["its files are encrypted at rest"]
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        return [f"unreadable config: {e}"]
    return model_problems(config, cpu=not torch.cuda.is_available())


def model_problems(config, cpu: bool) -> list[str]:
    """Why vLLM cannot run this model architecture here (a transformers config)."""
    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if cpu and head not in VLLM_CPU_HEAD_SIZES:
        return [f"head size {head} (vLLM's CPU attention takes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))})"]
    return []


def engine_args(model_dir: str, s: VllmSettings, lora: bool, cpu: bool) -> dict:
    """vLLM's AsyncEngineArgs for one engine on this model directory."""
    from vllm.config import StructuredOutputsConfig

    # enforce_eager as configured on CPU too: vLLM's CPU build compiles a full model with
    # Inductor at start (cached under ~/.cache/vllm), as its own server does, and runs LoRA
    # engines eager by itself
    args = dict(model=model_dir, dtype=s.dtype, max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
                tensor_parallel_size=s.tensor_parallel_size, enforce_eager=s.enforce_eager, disable_log_stats=True,
                # No whitespace between JSON tokens under response_format (an engine-wide
                # setting in vLLM): it changes nothing a JSON parser reads, and a grammar that
                # allows it lets a model spend its max_tokens on spaces (measured: a small
                # model answered '{ "status" \t \t\n...' to the limit, never closing the object).
                # vLLM takes it with a named backend only: xgrammar, its `auto` backend's first
                # choice; a schema xgrammar cannot follow is a 400 (no fallback to guidance).
                structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True))
    if not cpu:
        args["gpu_memory_utilization"] = s.gpu_memory_utilization
    if lora:
        args.update(enable_lora=True, max_loras=s.max_loras, max_cpu_loras=max(s.max_cpu_loras, s.max_loras),
                    max_lora_rank=s.max_lora_rank)
    return args


class VllmEngine(Engine):
    """vLLM's `AsyncLLM` on one model directory, adapters as `LoRARequest`s."""

    def __init__(self, model_dir: str, settings: VllmSettings, lora: bool = True,
                 observer: Callable[[list[str | None], list[str | None]], None] | None = None):
        self.model = None  # no torch module here: the model lives in vLLM's engine core
        self.model_dir, self.settings = model_dir, settings
        self.max_model_len: int | None = None
        # observer(running, waiting), as the transformers engine's: the adapter of each request
        # vLLM's scheduler runs and queues, after each of its steps (vLLM's stat-logger hook)
        self.observer, self._waiting = observer, 0
        self._llm = self._start(model_dir, settings, lora, _stat_logger(self._scheduled))
        self.max_model_len = self._llm.model_config.max_model_len
        self._ids = itertools.count(1)
        self._adapters: dict[str, object] = {}  # name -> LoRARequest
        self._open: dict[str, contextlib.ExitStack] = {}  # name -> its plain (opened) copy, while loaded
        self._running: set[str] = set()
        self._counts = {"submitted": 0, "finished": 0, "aborted": 0, "tokens": 0}

    def _scheduled(self, running: list[str | None], waiting: list[str | None]) -> None:
        self._waiting = len(waiting)
        if self.observer is not None:
            try:  # metrics are never worth a failed step
                self.observer(running, waiting)
            except Exception:
                log.exception("engine observer failed")

    @staticmethod
    def _start(model_dir: str, s: VllmSettings, lora: bool, stat_logger=None):
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cpu = not torch.cuda.is_available()
        if cpu:
            # vLLM's CPU backend reads these from the environment (no engine argument exists for
            # them); the engine core and its worker inherit them at start.
            os.environ.update(cpu_environment(s, os.environ))
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(model_dir, s, lora, cpu)),
                                         stat_loggers=[stat_logger] if stat_logger else None)

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: Request) -> AsyncIterator[Output]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if request.adapter is not None and request.adapter not in self._adapters:
            raise ValueError(f"no adapter {request.adapter!r} is loaded")
        s = request.sampling
        try:
            params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                    stop=list(s.stop) or None, seed=s.seed, ignore_eos=s.ignore_eos,
                                    presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                                    structured_outputs=_structured(s.constraint), logprobs=s.logprobs,
                                    skip_special_tokens=not s.keep_special_tokens,
                                    output_kind=RequestOutputKind.DELTA)
        except ValueError as e:  # vLLM's VLLMValidationError is a ValueError too
            raise RequestRejected(f"vLLM refused the request: {e}") from None
        self._counts["submitted"] += 1
        self._running.add(request.request_id)
        tokens, finished = 0, False
        outputs = self._llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt)), params,
                                     request.request_id, lora_request=self._adapters.get(request.adapter))
        try:
            async for out in _accepted(outputs):
                choice = out.outputs[0]
                tokens += len(choice.token_ids)
                reason = _reason(choice.finish_reason) if out.finished else None
                entries = _entries(choice, s.logprobs) if s.logprobs is not None else []
                if reason == "stop" and choice.stop_reason is None and not s.ignore_eos:
                    # vLLM counts the end-of-turn token it stopped on; raylab's usage (the
                    # transformers engine's) does not, so a version's billing is the same on
                    # either; nor does its text hold it, so its logprob goes too
                    tokens -= 1
                    entries = entries[:-1]
                if reason is not None or choice.text or entries:
                    yield Output(request.request_id, choice.text, tokens, reason, tuple(entries))
                if out.finished:
                    finished = True
                    self._counts["aborted" if reason == ABORT else "finished"] += 1
                    self._counts["tokens"] += tokens
                    return
        finally:
            self._running.discard(request.request_id)
            if not finished:  # the caller stopped listening (vLLM's generate aborts it on close too)
                self._counts["aborted"] += 1
                await self._llm.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            await self._llm.abort(request_id)

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        problems = lora_problems(path)
        if problems:
            raise ValueError(f"vLLM cannot serve adapter {name}: {'; '.join(problems)}")
        stack = contextlib.ExitStack()
        # A sealed adapter (governance.encryption) is opened in a private in-memory copy, kept
        # while it is loaded: vLLM reads the path again if its own CPU cache evicted it.
        local = stack.enter_context(storage.plain_dir(path))
        request = LoRARequest(name, next(self._ids), local)
        try:
            await self._llm.add_lora(request)
        except BaseException:
            stack.close()
            raise
        self._adapters[name], self._open[name] = request, stack

    async def unload_adapter(self, name: str) -> None:
        request = self._adapters.pop(name, None)
        if request is not None:
            await self._llm.remove_lora(request.lora_int_id)
            self._open.pop(name).close()

    def stats(self) -> dict:
        """running: requests generating now; waiting: those vLLM's scheduler held back at its
        last step; counts as the other engine's."""
        return {"running": len(self._running), "waiting": self._waiting, "adapters": sorted(self._adapters),
                "engine": "vllm"} | self._counts

    def shutdown(self) -> None:
        """Stop the engine-core process and release the adapters' opened copies."""
        with contextlib.suppress(Exception):
            self._llm.shutdown()
        for stack in self._open.values():
            stack.close()
        self._open.clear()


def _stat_logger(scheduled: Callable[[list[str | None], list[str | None]], None]):
    """A vLLM stat-logger factory (its documented extension point for metrics) that passes each
    step's scheduler counts on as (running, waiting): one entry per request, its LoRA's name
    (the engine's adapter name) or None for the model's own. vLLM calls it on the replica's
    event loop, from the output handler."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Scheduled(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                scheduled(_rows(scheduler_stats.running_lora_adapters, scheduler_stats.num_running_reqs),
                          _rows(scheduler_stats.waiting_lora_adapters, scheduler_stats.num_waiting_reqs))

        def log_engine_initialized(self):
            pass

    return Scheduled


def _rows(by_adapter: dict[str, int], total: int) -> list[str | None]:
    """Per-adapter counts as one entry per request, the rest (the model's own) as None."""
    named = [name for name, n in by_adapter.items() for _ in range(n)]
    return named + [None] * max(0, total - len(named))


def _structured(constraint: str | None):
    """Sampling.constraint ({"json": schema} | {"json_object": true}, as JSON text) as vLLM's
    structured-outputs parameters (its guided decoding), None without one."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**json.loads(constraint))


def _entries(choice, top: int) -> list[dict]:
    """OpenAI's chat logprobs entries for a delta's new tokens: each generated token's own
    logprob and, under top_logprobs, its `top` most likely alternatives (vLLM's ranks; its
    logprobs are the model's, before temperature and penalties)."""
    def entry(token: str | None, logprob: float) -> dict:
        token = token or ""
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    out = []
    for token_id, ranked in zip(choice.token_ids, choice.logprobs or [], strict=False):
        chosen = ranked[token_id]
        best = sorted((lp for lp in ranked.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank)
        out.append(entry(chosen.decoded_token, chosen.logprob)
                   | {"top_logprobs": [entry(lp.decoded_token, lp.logprob) for lp in best[:top]]})
    return out


async def _accepted(outputs):
    """vLLM's outputs for one request; a client error vLLM raises when it takes the request (a
    schema its structured-outputs backend cannot follow, before any output) as RequestRejected."""
    from vllm.exceptions import VLLMClientError

    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        return
    except (VLLMClientError, ValueError) as e:  # raised by its request validation, not by decoding
        raise RequestRejected(f"vLLM refused the request: {e}") from None
    try:
        yield first
        async for out in outputs:
            yield out
    finally:
        await outputs.aclose()  # a caller that stopped listening: vLLM's generate aborts the request


def _reason(finish_reason: str | None) -> str:
    """vLLM's finish reasons as the seam's: stop (EOS or a stop string), length, abort."""
    if finish_reason in ("stop", "length"):
        return finish_reason
    return ABORT if finish_reason in ("abort", None) else finish_reason
