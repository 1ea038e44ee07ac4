"""Where everything lives: the run directory, `$RAYLAB_HOME`, and the typed stage outputs.

    run = Run(cfg.output_dir)            # a local path or a URI (s3://, gs://, file://)
    run.manifest, run.train_final, run.trial(tid).train_metrics, run.eval_report_md
    write_manifest(run, manifest); read_manifest(run) -> DataManifest

The layout (DESIGN.md, "Run directory") is spelt out here and nowhere else: every stage asks
a `Run` for its paths, so a reader finds the whole contract in one page.

    <output_dir>/config.resolved.yaml     run.json (the pipeline's summary), events.jsonl
    <output_dir>/data/{train,val,records,quarantine}/*.parquet, data/manifest.json,
                                          data/datasheet.{md,json}, data/tokenizer/ (with pretrain.tokenizer)
    <output_dir>/train/                   Ray Train's run: checkpoint_*/, metrics.jsonl, loss.png,
                                          run.json (identity), final/ (Hugging Face format)
    <output_dir>/pretrain/                a nested run (its own data/ and train/; base/: the preset
                                          built for the corpus tokenizer, with pretrain.tokenizer)
    <output_dir>/optimize/<name>/         a nested run per pruning or distillation (base/: the pruned model or
                                          the student's start, teacher/: the merged teacher, data/manifest.json,
                                          train/: the recovery fine-tune or the student's training);
                                          optimize/report.{json,md,png}: each result against its parent
    <output_dir>/tune/                    Ray Tune's run: trials/<id>/ (nested runs), results.json|csv,
                                          best.yaml, study.db, importance / partial dependence / slice
    <output_dir>/eval/                    report.json, report.md, predictions.jsonl, rag.json (`eval --rag`)
    <output_dir>/index/                   LanceDB tables (<table>.lance/), raylab_index.json
    <output_dir>/synth/                   <generator>.jsonl (chat examples), datasheet.{md,json},
                                          cache/<request hash>.json (answers, so a re-run resumes)
    <output_dir>/serve/prompts/           <ingress replica>.jsonl: the served prompts' redacted sample
                                          (`raylab monitor` compares it with data/records/)

`$RAYLAB_HOME` (default ~/.raylab) holds what outlives a run: materialised presets, the
embedded registry, the verified registry cache and the running endpoint's address (`Home`).

The stage outputs other stages read are pydantic models (`DataManifest`, `TrainMeta`,
`SweepResult`, `EvalReport`) written and read through `write_json`/`read_json`, so a field a
reader relies on is declared once and a malformed file fails where it is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from raylab.core import storage
from raylab.errors import UserError

# Files inside a model directory (train/final/, a registry version, an export).
TRAIN_META = "raylab_train.json"
PRESET_MARKER = "raylab_preset.json"  # in a preset raylab built (random weights): which preset, which version
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
# Ray Train and Ray Tune name their runs inside <output_dir> (RunConfig(name=, storage_path=)).
TRAIN_RUN_NAME = "train"
TUNE_RUN_NAME = "tune"
SPLITS = ("train", "val", "records", "quarantine")
RESOLVED_CONFIG = "config.resolved.yaml"
MANIFEST = "manifest.json"  # the data stage's, in data/ (and an artifact of every train run's MLflow run)
# The sweep's outputs in <output_dir>/tune/, by what they hold.
TUNE_FILES = {"results": "results.json", "results_csv": "results.csv", "best": "best.yaml", "study": "study.db",
              "importance": "importance.json", "importance_png": "importance.png",
              "partial_dependence": "partial_dependence.json", "partial_dependence_png": "partial_dependence.png",
              "slice_png": "slice.png"}
EVAL_FILES = {"report": "report.json", "report_md": "report.md", "predictions": "predictions.jsonl",
              "rag": "rag.json",  # rag: `raylab eval --rag`, the index's retrieval quality
              # eval.global_explanation: attributions over a sample of the held-out split (raylab/explain/aggregate.py)
              "global_explanation": "global_explanation.json", "global_explanation_png": "global_explanation.png"}
# `raylab optimize`'s comparison of each result with its parent, in <output_dir>/optimize/ (beside the nested runs)
OPTIMIZE_FILES = {"report": "report.json", "report_md": "report.md", "report_png": "report.png"}
# Sequence-level distillation's corpus in its nested run (raylab/optimize/sequence.py): the teacher's
# answers as chat and completion JSONL, and the summary written last (settings and counts).
TEACHER_FILES = {"chat": "teacher-chat.jsonl", "completion": "teacher-text.jsonl", "summary": "teacher.json"}
INDEX_MANIFEST = "raylab_index.json"
SYNTH_CACHE = "cache"
FINAL_DIR = "final"  # the trained model inside a train run: train/final/
DATASHEET_FILES = {"md": "datasheet.md", "json": "datasheet.json"}  # beside data/manifest.json
# A registered version's model card: artifacts of its MLflow run under card/ (raylab/registry/cards.py).
CARD_DIR = "card"
CARD_FILES = {"md": "README.md", "json": "model_card.json"}  # README.md: the Hugging Face name for a card


def _join(base: str, *parts: str) -> str:
    return storage.join(base, *parts)


class Run:
    """The paths of one run directory. Nested runs (pre-training, tune trials) are Runs too."""

    def __init__(self, output_dir: str):
        self.root = output_dir.rstrip("/") or output_dir

    def __repr__(self) -> str:
        return f"Run({self.root!r})"

    @property
    def name(self) -> str:
        return self.root.rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    # the run as a whole
    @property
    def resolved_config(self) -> str:
        return _join(self.root, RESOLVED_CONFIG)

    @property
    def summary(self) -> str:
        return _join(self.root, "run.json")

    @property
    def events(self) -> str:
        """Every state change of this run, one JSON line each (raylab/core/events.py)."""
        return _join(self.root, "events.jsonl")

    # data stage
    @property
    def data(self) -> str:
        return _join(self.root, "data")

    @property
    def manifest(self) -> str:
        return _join(self.data, MANIFEST)

    def datasheet(self, kind: str = "md") -> str:
        """The data run's datasheet (Gebru et al.), "md" or "json" (raylab/data/datasheet.py)."""
        return _join(self.data, DATASHEET_FILES[kind])

    @property
    def tokenizer(self) -> str:
        """The tokenizer the data stage trained on the redacted corpus (`pretrain.tokenizer`)."""
        return _join(self.data, "tokenizer")

    def split(self, name: str) -> str:
        if name not in SPLITS:
            raise ValueError(f"unknown data split {name!r}; expected one of {SPLITS}")
        return _join(self.data, name)

    # train stage (Ray Train's own run directory)
    @property
    def train(self) -> str:
        return _join(self.root, TRAIN_RUN_NAME)

    @property
    def train_final(self) -> str:
        return _join(self.train, FINAL_DIR)

    @property
    def train_meta(self) -> str:
        return _join(self.train_final, TRAIN_META)

    @property
    def train_metrics(self) -> str:
        return _join(self.train, "metrics.jsonl")

    @property
    def train_remote_job(self) -> str:
        """train.provider openai_compatible: file ids and the job id, kept as each is made."""
        return _join(self.train, "remote_job.json")

    @property
    def train_remote_pointer(self) -> str:
        """A remote version's artifact: the provider, its job and the fine-tuned model's name."""
        return _join(self.train_final, "remote.json")

    @property
    def train_loss_png(self) -> str:
        return _join(self.train, "loss.png")

    @property
    def train_identity(self) -> str:
        return train_identity_in(self.train)

    @property
    def base(self) -> str:
        """Where a nested run's training starts: a preset built from scratch for the corpus
        tokenizer (pretrain), a pruned model or a distillation student (optimize)."""
        return _join(self.root, "base")

    @property
    def teacher(self) -> str:
        """A distillation's teacher, merged (optimize): read by every worker of the train
        objective `distill` (raylab/train/distill.py)."""
        return _join(self.root, "teacher")

    def teacher_file(self, what: str) -> str:
        """Sequence-level distillation's corpus by what it holds (TEACHER_FILES): chat and completion
        (the teacher's answers as JSONL, the student's data sources), summary (settings and counts)."""
        return _join(self.root, TEACHER_FILES[what])

    # nested runs
    @property
    def pretrain(self) -> Run:
        return Run(_join(self.root, "pretrain"))

    def optimize(self, name: str) -> Run:
        """A nested run of `raylab optimize` (a pruned model's recovery fine-tune: its base/ is
        the pruned model, its data/ a copy of this run's manifest, its train/ the fine-tune; a
        distillation: base/ the student's start, teacher/ the merged teacher)."""
        return Run(_join(self.root, "optimize", name))

    def optimize_file(self, what: str) -> str:
        """`raylab optimize`'s report by what it holds (OPTIMIZE_FILES): report (every result with its parent's
        measurements, JSON), report_md (the table), report_png (the bar chart)."""
        return _join(self.root, "optimize", OPTIMIZE_FILES[what])

    @property
    def tune(self) -> str:
        return _join(self.root, TUNE_RUN_NAME)

    def trial(self, trial_id: str) -> Run:
        return Run(_join(self.tune, "trials", trial_id))

    def tune_file(self, what: str) -> str:
        """A sweep output by what it holds (TUNE_FILES): results, best, importance_png, ..."""
        return _join(self.tune, TUNE_FILES[what])

    # eval stage
    @property
    def eval(self) -> str:
        return _join(self.root, "eval")

    def eval_file(self, what: str) -> str:
        """An evaluation output by what it holds (EVAL_FILES): report, report_md, predictions, rag."""
        return _join(self.eval, EVAL_FILES[what])

    # index stage (`raylab index`; index.directory may put it elsewhere)
    @property
    def index(self) -> str:
        return _join(self.root, "index")

    # synth stage (`raylab synth`)
    @property
    def synth(self) -> str:
        return _join(self.root, "synth")

    def synth_output(self, generator: str) -> str:
        """One generator's kept examples: synth/<generator>.jsonl (a chat source for the data stage)."""
        return _join(self.synth, f"{generator}.jsonl")

    def synth_datasheet(self, kind: str = "md") -> str:
        """The synth run's datasheet, "md" or "json" (raylab/synth/datasheet.py)."""
        return _join(self.synth, DATASHEET_FILES[kind])

    @property
    def synth_cache(self) -> str:
        """The endpoint's answers by request hash (raylab/synth/client.py)."""
        return _join(self.synth, SYNTH_CACHE)

    # serving (`raylab serve`): what the endpoint records for `raylab monitor`
    @property
    def served_prompts(self) -> str:
        """The served-prompt sample, one file per Ingress replica (raylab/serve/sample.py)."""
        return _join(self.root, "serve", "prompts")

    def served_prompts_file(self, replica: str) -> str:
        """One Ingress replica's redacted prompt sample: serve/prompts/<replica>.jsonl."""
        return _join(self.served_prompts, f"{replica}.jsonl")


def index_manifest(index_dir: str) -> str:
    """The manifest inside a LanceDB index directory (raylab/rag): the model and dimensions
    a reader must embed queries with, and the last build's counts."""
    return _join(index_dir, INDEX_MANIFEST)


def index_table(index_dir: str, table: str) -> str:
    """A LanceDB table's directory inside an index directory (LanceDB's `<table>.lance`)."""
    return _join(index_dir, f"{table}.lance")


def synth_cache_entry(cache_dir: str, key: str) -> str:
    """One cached answer in the synth cache: <key>.json (key: the request's sha256)."""
    return _join(cache_dir, f"{key}.json")


def card_file(directory: str, kind: str) -> str:
    """A model card file ("md" or "json") inside a directory: the card/ artifact folder, a
    download or a user's --output directory."""
    return _join(directory, CARD_FILES[kind])


def default_output_dir(config_stem: str) -> str:
    """Where a config's run goes when it names no output_dir: runs/<config file stem>."""
    return os.path.join("runs", config_stem)


def model_file(model_dir: str, name: str) -> str:
    """A file inside a model directory (TRAIN_META, ADAPTER_CONFIG, MODEL_CONFIG)."""
    return _join(model_dir, name)


# ---------------------------------------------------------------- $RAYLAB_HOME


class Home:
    """`$RAYLAB_HOME` (default ~/.raylab): what outlives a run directory."""

    def __init__(self, root: Path | None = None):
        self.root = root or Path(os.environ.get("RAYLAB_HOME") or Path.home() / ".raylab").expanduser().resolve()

    def preset(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    def registry_cache(self, name: str, version: int | str) -> Path:
        return self.root / "cache" / "registry" / name / str(version)

    @property
    def endpoint(self) -> Path:
        return self.root / "serve" / "endpoint.json"

    @property
    def canary(self) -> Path:
        """The canary rollout's state (serve/rollout.py): what its controller resumes from."""
        return self.root / "serve" / "canary.json"

    @property
    def events(self) -> Path:
        """Every state change on this machine, a JSON-lines file per day (core/events.py)."""
        return self.root / "events"

    @property
    def control_db(self) -> Path:
        """The default control-plane database (core/controldb.py): the audit log, later identities."""
        return self.root / "raylab.db"

    @property
    def api_files(self) -> Path:
        """The fine-tuning service's uploaded files and job results by default (api.files)."""
        return self.root / "api" / "files"

    @property
    def api_runs(self) -> Path:
        """The run directories of the service's jobs by default (api.runs)."""
        return self.root / "api" / "runs"

    @property
    def audit_checkpoints(self) -> Path:
        """Where signed audit checkpoints go by default (core/audit/)."""
        return self.root / "audit" / "checkpoints"


def audit_key_default() -> Path:
    """The audit signing key's default path: under the user's config directory, not
    $RAYLAB_HOME, so the key does not sit beside the database it protects."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home).expanduser() / "raylab" / "audit-ed25519.pem"


def audit_checkpoint(location: str, length: int) -> str:
    """One signed checkpoint file: named by the chain length it covers, so names sort."""
    return _join(location, f"{length:012d}.json")


def api_file(root: str, org: str, file_id: str) -> str:
    """One uploaded file (or a job's result file) of the fine-tuning service: <root>/<org>/<id>."""
    return _join(root, org, file_id)


def api_run(root: str, job_id: str) -> str:
    """A fine-tuning job's run directory: <root>/<job id>."""
    return _join(root, job_id)


def home() -> Home:
    """`$RAYLAB_HOME` as it is set now (tests and workers set it per process)."""
    return Home()


# ---------------------------------------------------------------- typed stage outputs


class Output(BaseModel):
    """A stage output other stages read. Unknown keys are kept (a newer raylab may add some),
    but every key a reader uses is declared."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")  # NaN metrics stay NaN


class SplitTokens(Output):
    documents: int
    tokens: int
    target_tokens: int
    sequences: int
    packing_efficiency: float
    length_histogram: dict[str, list[int]]


class Tokens(Output):
    train: SplitTokens
    val: SplitTokens
    max_seq_len: int


class Counts(Output):
    read: int
    accepted: int
    rejected: int
    rejected_fraction: float
    rejected_by_reason: dict[str, int]
    duplicates: dict[str, int]
    # Data stages since `raylab erase` also write `erased` (records dropped because they are
    # on the suppression list, core/lineage.py). Read it with `erased_count`: it is not declared,
    # because a declared default would enter older manifests' dumps and change their hash
    # (manifest_hash), which trained versions and resumed runs compare.


def erased_count(counts: Counts) -> int:
    return int(getattr(counts, "erased", 0) or 0)


class DataManifest(Output):
    """data/manifest.json: what the data stage read and wrote (raylab/data/stage.py)."""

    version: int
    stage: str = "data"
    created: str
    config_hash: str
    cache_key: str | None
    tokenizer: dict[str, Any]
    inputs: list[dict[str, Any]]
    counts: Counts
    by_source: dict[str, dict[str, int]]
    pii_redactions: dict[str, int]
    tokens: Tokens
    outputs: dict[str, str]
    cache: dict[str, Any] = {}


def manifest_hash(manifest: DataManifest) -> str:
    """What names a data stage's output: its manifest without the time it was written or
    whether it came from the cache. A trained version records it (`data_manifest_hash`) and the
    lineage index keys data runs by it, so the two join."""
    import hashlib
    import json

    stable = manifest.model_dump(mode="json", exclude={"created", "cache"})
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


class TrainMeta(Output):
    """train/final/raylab_train.json: lineage and metrics of a trained model (raylab/train)."""

    stage: str = "train"
    identity: str
    base_model: str
    base_model_path: str
    method: str
    data_manifest_hash: str
    config_hash: str
    code_version: str
    steps: int
    epochs_started: int
    stopped_early: bool
    world_size: int
    replica_digests: list[str]
    worker_nodes: list[str]
    resumed_at_steps: list[int]
    ingest: dict[str, str] = {}  # how each split reached the workers (driver/materialized/streamed; cached/streamed)
    trained_tokens: int
    flops_per_token: float
    estimated_training_flops: float
    flops_formula: str
    metrics: dict[str, float | None]
    best_checkpoint: str | None
    latest_checkpoint: str
    train_seconds: float
    created: str
    dtype: str | None = None  # the base weights' dtype on the workers (model.dtype resolved there)
    precision: str | None = None  # bf16 autocast, or the weights' dtype


class SweepResult(Output):
    """tune/results.json: every trial ranked, the winner, the analysis (raylab/tune)."""

    metric: str
    mode: str
    searcher: str
    asha: bool
    trials: int
    finished: int
    stopped_early: int
    errors: int
    steps_spent: int
    seconds: float
    best: dict[str, Any] | None
    results: list[dict[str, Any]]
    analysis: dict[str, Any] = {}


class IndexManifest(Output):
    """<index dir>/raylab_index.json: how an index was built (raylab/rag)."""

    version: int
    stage: str = "index"
    created: str
    table: str
    model: str
    dimensions: int
    max_seq_length: int
    chunk_tokens: int
    overlap: int
    metric: str
    rows: int
    counts: dict[str, int]
    data: dict[str, Any]
    ann: dict[str, Any]
    timings: dict[str, float]
    full_text: dict[str, Any] | None = None  # the BM25 index for hybrid search (index.hybrid); None: none
    store: str = "lancedb"  # where the chunks are: lancedb (the index directory) or pgvector (`database`)
    database: str | None = None  # pgvector: the config's URL as written (a ${env:NAME} reference, no secret)


class EvalReport(Output):
    """eval/report.json: base vs tuned model on the held-out split or given prompts."""

    config: str | None
    model: str
    model_path: str
    base_model: str
    input: str
    models: dict[str, dict[str, float | int]]
    samples: list[dict[str, Any]]
    seconds: float
    bias: dict[str, dict[str, Any]] | None = None  # eval.bias_probes: {base|tuned: bias table} (evaluate/bias.py)
    global_explanation: dict[str, Any] | None = None  # eval.global_explanation: the tuned model's (explain/aggregate.py)


class RagEvalReport(Output):
    """eval/rag.json: `raylab eval --rag`, the index's retrieval quality on labelled questions
    (raylab/rag/evaluate.py); the registry's min_recall_at_k / min_mrr gates read it."""

    stage: str = "eval-rag"
    created: str
    index: str
    model: str
    questions: str
    search: str = "vector"  # index.eval.search
    org: str | None = None  # index.eval.org: whose readable chunks were searched
    k: int
    count: int
    recall_at_k: float
    mrr: float
    faithfulness: float | None
    answers: int
    answer_sentences: int
    supported_sentences: int
    min_overlap: float
    latency_ms: dict[str, float]
    per_question: list[dict[str, Any]]


M = TypeVar("M", bound=BaseModel)


def write_json(location: str, output: BaseModel) -> str:
    """Write a stage output (pretty JSON, NaN allowed as in metrics) and return its location."""
    return storage.write_text(location, output.model_dump_json(indent=2) + "\n")


def read_json(location: str, kind: type[M]) -> M:
    """Read a stage output, checking it has the fields its readers rely on."""
    try:
        return kind.model_validate_json(storage.read_text(location))
    except ValidationError as e:
        fields = ", ".join(".".join(map(str, err["loc"])) for err in e.errors()[:5])
        raise UserError(f"{location} is not a valid {kind.__name__} ({fields}); it was written by another "
                        "raylab version or edited by hand: re-run the stage that writes it") from None


def read_manifest(run: Run, source: str | None = None) -> DataManifest:
    """The data stage's manifest, or exit 2 telling the user to run the data stage."""
    if not storage.exists(run.manifest):
        raise UserError(f"no data stage output at {run.manifest}; run `raylab data {source or 'CONFIG'}` first")
    return read_json(run.manifest, DataManifest)


def train_identity_in(train_dir: str) -> str:
    """A Ray Train run directory's identity file (what `Run.train_identity` is for a run's own
    train/), for a training run known only by its directory (a checkpoint's parent)."""
    return _join(train_dir, "run.json")
