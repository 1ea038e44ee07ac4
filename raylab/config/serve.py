"""The `serve:` section: the OpenAI-compatible endpoint."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from raylab.config.types import PathOrUri, PositiveInt, Section, invalid


def is_loopback(host: str) -> bool:
    """Whether `host` binds only this machine. Other names may resolve anywhere, and "" or
    0.0.0.0 bind every interface, so only localhost and loopback addresses count."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of the Generator deployment."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: PositiveInt = Field(1, description="replicas at most under load")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start; default min_replicas")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests per replica it scales towards")
    upscale_delay_s: float = Field(10.0, ge=0, description="load must last this long before scaling up")
    downscale_delay_s: float = Field(60.0, ge=0, description="idle this long before scaling down")
    look_back_period_s: float = Field(30.0, gt=10, description="averaging window; above Serve's 10 s metrics interval")


class VllmConfig(Section):
    """The vLLM engine's settings (serve.engine vllm, or auto where vLLM is installed)."""

    kv_cache_gb: float = Field(1.0, gt=0, description="CPU: GiB of the replica's memory for vLLM's KV cache "
                               "(VLLM_CPU_KVCACHE_SPACE), counted by the resource plan so Ray's object store keeps its share")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU: the share of the GPU's memory vLLM "
                                          "takes for weights and KV cache")
    tensor_parallel_size: PositiveInt = Field(1, description="GPUs one replica's model is split over (tensor "
                                              "parallelism); serve.gpus_per_replica must be at least this")
    max_loras: PositiveInt = Field(4, description="adapters that can decode in one batch")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        64, description="the largest LoRA rank it serves (vLLM's ranks); higher ranks go to the transformers engine")
    max_num_seqs: PositiveInt = Field(64, description="sequences decoded together")
    max_model_len: PositiveInt | None = Field(None, description="context length; default the model's")
    enforce_eager: bool = Field(False, description="no compilation: no CUDA graphs on GPU, no torch.compile of a "
                                  "full model on CPU (vLLM runs LoRA engines eager on CPU anyway)")
    tool_parser: str | None = Field(None, description="vLLM's tool-call parser for the base's family (`vllm serve "
                                    "--tool-call-parser` names: hermes, llama3_json, mistral, pythonic, ...): with "
                                    "one, chat tool_choice auto (OpenAI's default with tools) is served on vLLM "
                                    "versions, the calls the answer holds returned as tool_calls; without, a 400")


class ExplainServeConfig(Section):
    """`POST /v1/explain` on the endpoint: token attributions in their own deployment (docs/explain.md).
    Off by default: then no Explainer deployment exists and the route answers 404."""

    enabled: bool = Field(False, description="deploy the Explainer next to the Generator and serve /v1/explain")
    min_replicas: int = Field(1, ge=0, description="Explainer replicas kept when idle (0: none until a request comes)")
    max_replicas: PositiveInt = Field(1, description="Explainer replicas at most under load")
    max_ongoing_requests: PositiveInt = Field(1, description="explanations a replica runs at once (each on one torch "
                                              "thread; the same version's run one after another)")
    max_queued_requests: PositiveInt = Field(8, description="explanations waiting for a replica; beyond, a 429")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs per Explainer replica")
    max_models_per_replica: PositiveInt = Field(1, description="versions kept loaded per Explainer replica (LRU)")
    max_n_steps: PositiveInt = Field(256, description="largest n_steps (integrated gradients) a request may ask")
    max_samples: PositiveInt = Field(200, description="largest samples (shapley_sampling) a request may ask")
    max_evals: PositiveInt = Field(2000, description="largest evals (shap's model evaluations) a request may ask")
    keep_results: PositiveInt = Field(64, description="recent explanations kept for GET /v1/explain/{id}/html")
    keep_seconds: float = Field(3600.0, gt=0, description="how long an explanation stays there")

    @model_validator(mode="after")
    def _replicas(self) -> ExplainServeConfig:
        if self.min_replicas > self.max_replicas:
            raise invalid(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class RagServeConfig(Section):
    """Retrieval at serving time: an index `raylab index` built, attached to the served model
    (docs/retrieval.md, "Serving with retrieval"). Chat requests retrieve from it; its
    embedding model is served at `POST /v1/embeddings`."""

    index: PathOrUri | None = Field(
        None, description="the index directory; default the config's index.directory (<output_dir>/index). It must "
        "have been built with index.model")
    by_default: bool = Field(
        True, description="retrieve for every chat request unless it sends raylab.retrieval: false; false: only for "
        "requests that send raylab.retrieval: true or raylab.top_k")
    top_k: PositiveInt = Field(4, description="chunks retrieved per chat request (a request may set raylab.top_k)")
    max_top_k: PositiveInt = Field(16, description="largest raylab.top_k a request may ask (400 beyond)")
    search: Literal["vector", "hybrid"] = Field(
        "vector", description="how chat requests retrieve (a request may set raylab.search): vector (cosine), or "
        "hybrid: vector and keyword (BM25) rankings fused by reciprocal rank, which finds exact rare terms (codes, "
        "names) an embedding misses; needs an index built with index.hybrid")
    nprobes: PositiveInt = Field(20, description="IVF partitions searched per query (only with an IVF-PQ index)")
    refine_factor: PositiveInt | None = Field(
        None, description="re-rank refine_factor * top_k PQ candidates by exact distance (only with an IVF-PQ index)")
    max_inputs: PositiveInt = Field(64, description="most inputs one /v1/embeddings request may embed (400 beyond)")
    max_input_tokens: PositiveInt | None = Field(
        None, description="longest /v1/embeddings input in the embedder's tokens (400 beyond); default the "
        "embedder's max_seq_length, past which it would truncate silently")
    cpus_per_replica: float = Field(0.5, gt=0, description="Ray CPUs per Embedder replica (it runs one torch thread)")
    max_replicas: PositiveInt = Field(1, description="Embedder replicas at most under load (autoscaled from one)")

    @model_validator(mode="after")
    def _top_k(self) -> RagServeConfig:
        if self.top_k > self.max_top_k:
            raise invalid(f"top_k ({self.top_k}) must be at most max_top_k ({self.max_top_k})", at="top_k")
        return self


class MonitorConfig(Section):
    """Monitoring a served version (docs/serving.md, "Monitoring"): a bounded sample of served
    prompts, redacted by the data stage's PII detectors, that `raylab monitor CONFIG`
    compares with the training data."""

    sample_prompts: int = Field(1000, ge=0, description="prompts kept per Ingress replica (a uniform reservoir "
                                "sample of everything served); 0: record none")
    flush_every: PositiveInt = Field(20, description="write the sample to <output_dir>/serve/prompts/ after this "
                                     "many sampled prompts (and when the endpoint stops)")
    drift_threshold: float = Field(0.25, gt=0, le=1, description="`raylab monitor` exits 1 when the overall drift "
                                   "score (the largest statistic, each in [0, 1]) is above this")
    min_prompts: PositiveInt = Field(50, description="fewer sampled prompts than this: `raylab monitor` reports "
                                     "nothing and exits 2 (a small sample's statistics are noise)")
    vocabulary: PositiveInt = Field(100, description="the token statistic's bins: the training data's most frequent "
                                    "words, plus one bin for every other word")
    max_training_records: PositiveInt = Field(20000, description="training records compared at most (a fixed "
                                              "sample by record id beyond)")


class CanaryConfig(Section):
    """`raylab deploy REF --canary PCT --for DURATION` (docs/serving.md, "Canary rollout"): the
    thresholds the candidate's online metrics must hold. The controller rolls back as soon as
    one is broken (after min_requests), and promotes once they held for the whole window."""

    max_error_rate: float = Field(0.01, ge=0, le=1, description="largest share of the candidate's requests "
                                  "answered with a 5xx")
    max_p99_latency_ms: float | None = Field(None, gt=0, description="largest p99 request latency of the candidate, "
                                             "in milliseconds; null: not checked")
    max_tokens_per_response: float | None = Field(None, gt=0, description="largest mean completion tokens per "
                                                  "successful candidate response; null: not checked")
    min_feedback: float | None = Field(None, ge=0, le=1, description="smallest mean user rating (POST /v1/feedback, "
                                       "score 0..1) of the candidate's responses; null: not checked")
    min_feedback_count: PositiveInt = Field(5, description="ratings needed before min_feedback is checked")
    min_requests: PositiveInt = Field(20, description="candidate requests needed before any decision")
    window_s: float = Field(600.0, gt=0, description="how long the candidate must hold before it is promoted "
                            "(`--for` overrides it)")
    patience: float = Field(3.0, ge=1, description="roll back when window_s x patience passes without "
                            "min_requests candidate requests")
    check_interval_s: float = Field(5.0, gt=0, description="how often the controller looks at the metrics")


class ServeConfig(Section):
    """`raylab serve`: the OpenAI-compatible endpoint (see docs/serving.md)."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 on clusters")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="replica autoscaling")
    max_ongoing_requests: PositiveInt = Field(8, description="requests a replica takes at once; above the autoscaling target")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs per Generator replica (also its torch threads; vLLM on CPU gets one OpenMP thread fewer, at least one)")
    gpus_per_replica: float = Field(0.0, ge=0, description="Ray GPUs per Generator replica")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="what generates tokens: vllm (vLLM's engine; lora adapters and full models), "
        "transformers (raylab's continuous batching; every method), auto (vLLM for each version it can serve when "
        "it is installed, transformers for the rest: DoRA, hybrid, ranks vLLM refuses, models it cannot run)")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="the vLLM engine's settings")
    max_batch_size: PositiveInt = Field(8, description="sequences decoded together; 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long an idle engine waits for more arrivals to "
                                       "prefill together (0: it starts at once; newcomers join between steps)")
    stream_interval_ms: float = Field(50.0, ge=0, description="a streaming response's tokens leave the Generator "
                                      "at most this often, each still its own event to the client (the first at "
                                      "once, the last when it is ready): a message between Ray processes costs more "
                                      "than a small model's token; 0 sends every decode step's token at once")
    max_adapters_per_replica: PositiveInt = Field(4, description="versions kept loaded per replica (LRU)")
    max_prompt_tokens: PositiveInt = Field(2048, description="longer prompts are a 400")
    max_tokens: PositiveInt = Field(512, description="largest max_tokens a request may ask (400 beyond)")
    max_request_bytes: PositiveInt = Field(1_000_000, description="larger request bodies are a 400")
    resubmit_timeout_s: float = Field(60.0, gt=0, description="a request with no token yet is re-submitted while "
                                      "a lost Generator replica is replaced, for this long (then a 503)")
    api_keys_env: str | None = Field(None, description="env variable with comma-separated API keys (Bearer)")
    api_keys_file: PathOrUri | None = Field(None, description="file with one API key per line (Bearer)")
    api_keys_db: bool = Field(False, description="also accept the API keys `raylab keys create` made (the "
                              "control-plane database: governance.database), each with its role and organisation; "
                              "revoked keys are refused from the next request; needed with api.enabled when the "
                              "endpoint takes other keys, so the service's callers reach their fine-tuned models")
    oidc: bool = Field(False, description="also accept OIDC bearer tokens (JWTs), verified as governance.oidc "
                       "says, each with the role and organisation its claims name")
    allow_unauthenticated: bool = Field(False, description="serve a non-loopback host without API keys (anyone "
                                        "who reaches it may use it)")
    explain: ExplainServeConfig = Field(default_factory=ExplainServeConfig, description="token attributions at "
                                        "POST /v1/explain (limits and defaults from the explain: section)")
    rag: RagServeConfig | None = Field(None, description="retrieval: an index attached to the served model, and "
                                       "/v1/embeddings (needs the rag extra)")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="the served-prompt sample and "
                                   "`raylab monitor`'s drift threshold")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="the thresholds of a canary rollout "
                                 "(`raylab deploy REF --canary PCT --for DURATION`)")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        a = self.autoscaling
        if not (self.api_keys_env or self.api_keys_file or self.api_keys_db or self.oidc or self.allow_unauthenticated
                or is_loopback(self.host)):
            raise invalid(f"serving on {self.host!r} (reachable from other machines) needs API keys: set "
                          "serve.api_keys_env (a variable's name), serve.api_keys_file, serve.api_keys_db or serve.oidc, "
                          "or set "
                          "serve.allow_unauthenticated: true to serve it open", at="host")
        if a.min_replicas > a.max_replicas:
            raise invalid(f"min_replicas ({a.min_replicas}) > max_replicas ({a.max_replicas})", at="autoscaling")
        if self.max_ongoing_requests <= a.target_ongoing_requests:
            raise invalid(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be above "
                f"autoscaling.target_ongoing_requests ({a.target_ongoing_requests})"
            )
        if self.engine != "transformers" and self.gpus_per_replica and self.gpus_per_replica < self.vllm.tensor_parallel_size:
            raise invalid(f"vllm.tensor_parallel_size ({self.vllm.tensor_parallel_size}) needs as many GPUs per replica; "
                          f"gpus_per_replica is {self.gpus_per_replica}", at="vllm")
        if self.max_ongoing_requests < self.max_batch_size:
            raise invalid(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                          f"({self.max_batch_size}), or a replica never holds a full batch")
        return self
