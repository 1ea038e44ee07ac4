"""The `synth:` section: `raylab synth CONFIG` generates training examples through an
OpenAI-compatible endpoint and filters them (docs/synth.md).

    synth:
      endpoint: {base_url: http://127.0.0.1:8000/v1, model: acme-assistant, api_key: ${env:SYNTH_KEY}}
      grounded_qa: {data_run: runs/acme}           # or files: [handbook/*.md]
      self_instruct: {seeds: ["Write a haiku about widgets.", ...], instructions: 200}
      max_requests: 2000
      decontaminate: [eval/questions.jsonl]

A non-loopback base_url is refused unless `governance.allow_remote: true`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from raylab.config.types import PathOrUri, PositiveInt, Section, StrList, invalid

# The prompts ask for one JSON object and nothing else; raylab/synth/parse.py holds them to it.
GROUNDED_QA_PROMPT = (
    "Here is a passage from a company's documents:\n\n{chunk}\n\n"
    "Write {n} question(s) a customer or employee might ask that this passage answers, each with its answer "
    "taken from the passage alone. Reply with only a JSON object, no other text: "
    '{{"pairs": [{{"question": "...", "answer": "..."}}]}}'
)
INSTRUCTION_PROMPT = (
    "Come up with a series of tasks. Here are examples of tasks:\n\n{examples}\n\n"
    "Write {n} new task instruction(s), different from these and from each other. Reply with only a JSON "
    'object, no other text: {{"instructions": ["...", "..."]}}'
)
OUTPUT_PROMPT = (
    "Task: {instruction}\n\n"
    "If the task needs an input (a text to work on, a list, numbers), write one; otherwise leave it empty. "
    "Then write the correct output for the task. Reply with only a JSON object, no other text: "
    '{{"input": "...", "output": "..."}}'
)
REFUSALS = [r"\bas an ai\b", r"\bas a language model\b", r"\bi'?m sorry\b", r"\bi am sorry\b",
            r"\bi cannot (help|assist|provide|answer)\b", r"\bi can'?t (help|assist|provide|answer)\b",
            r"\bi am (unable|not able) to\b", r"\bi'?m (unable|not able) to\b"]


class EndpointConfig(Section):
    """The OpenAI-compatible chat completions endpoint the generators call."""

    base_url: str = Field(description="the API's base URL, ending before /chat/completions (http://HOST:PORT/v1); "
                          "a non-loopback host needs governance.allow_remote: true")
    model: str = Field(description="the `model` field of every request")
    api_key: str | None = Field(None, description="a ${env:NAME} reference to the bearer key; none for an open "
                                "local endpoint")
    timeout_s: float = Field(60.0, gt=0, description="seconds one request may take; a timeout is counted failed "
                             "(reason `timeout`), not retried, and not cached, so a re-run tries it again")
    max_retries: int = Field(4, ge=0, description="retries of a request answered 429 or 5xx, or whose connection "
                             "failed")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay, doubled each retry, when the answer has "
                             "no Retry-After header (which is honoured, up to max_backoff_s)")
    max_backoff_s: float = Field(60.0, ge=0, description="longest wait before one retry")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature of every request")
    max_tokens: PositiveInt = Field(512, description="most tokens per answer")


class GroundedQaConfig(Section):
    """Questions and answers from document chunks; each example keeps its chunk's id."""

    data_run: PathOrUri | None = Field(
        None, description="a run directory whose data stage ran: its accepted train-split records are the chunks "
        "(its val split is decontaminated against)")
    files: StrList = Field(default_factory=list, description="plain text files (.txt/.md); each paragraph (blank-"
                           "line separated) is a chunk, id FILE#N")
    pairs_per_chunk: PositiveInt = Field(2, description="question/answer pairs asked for per chunk ({n})")
    max_chunks: PositiveInt | None = Field(None, description="use the first N chunks (by id); default all")
    min_chunk_chars: int = Field(80, ge=0, description="skip shorter chunks (headings, signatures)")
    prompt: str = Field(GROUNDED_QA_PROMPT, description="the prompt: {chunk} and {n} are filled in; the answer "
                        'must be {"pairs": [{"question", "answer"}]}')

    @model_validator(mode="after")
    def _some_input(self) -> GroundedQaConfig:
        if self.data_run is None and not self.files:
            raise invalid("give data_run (a run directory the data stage wrote) or files (text files)", at="files")
        for key in ("{chunk}", "{n}"):
            if key not in self.prompt:
                raise invalid(f"the prompt must contain {key}", at="prompt")
        return self


class SelfInstructConfig(Section):
    """Self-Instruct (Wang et al., 2023): new instructions from seed tasks in context, then an
    output for each."""

    seeds: StrList = Field(default_factory=list, description="seed task instructions, inline")
    seed_file: PathOrUri | None = Field(None, description="JSONL of {instruction} (other keys ignored) or a text "
                                        "file with one instruction per line")
    instructions: PositiveInt = Field(100, description="new instructions wanted (before the output step)")
    seed_examples: int = Field(6, ge=0, description="seed tasks in each prompt (the paper: 6)")
    generated_examples: int = Field(2, ge=0, description="earlier generated tasks in each prompt (the paper: 2; "
                                    "seeds fill in until there are enough)")
    per_prompt: PositiveInt = Field(8, description="instructions asked for per prompt ({n})")
    seed: int = Field(0, description="which examples each prompt shows")
    instruction_prompt: str = Field(INSTRUCTION_PROMPT, description="{examples} (numbered) and {n} are filled in; "
                                    'the answer must be {"instructions": [...]}')
    output_prompt: str = Field(OUTPUT_PROMPT, description='{instruction} is filled in; the answer must be '
                               '{"input": "...", "output": "..."} (input may be "")')

    @model_validator(mode="after")
    def _some_seeds(self) -> SelfInstructConfig:
        if not self.seeds and self.seed_file is None:
            raise invalid("give seeds (inline) or seed_file", at="seeds")
        for key, prompt, fields in (("instruction_prompt", self.instruction_prompt, ("{examples}", "{n}")),
                                    ("output_prompt", self.output_prompt, ("{instruction}",))):
            for f in fields:
                if f not in prompt:
                    raise invalid(f"the prompt must contain {f}", at=key)
        return self


class SynthFiltersConfig(Section):
    """What a generated example must pass to be kept; each filter's drops are counted in the datasheet."""

    novelty: float = Field(0.7, gt=0, le=1, description="drop an example whose prompt has ROUGE-L >= this with one "
                           "already kept (Self-Instruct's rule)")
    num_perm: PositiveInt = Field(128, description="MinHash permutations for the novelty candidates")
    bands: PositiveInt = Field(32, description="LSH bands (num_perm / bands rows each): prompts sharing a band are "
                               "candidates, compared by exact ROUGE-L")
    ngram: PositiveInt = Field(5, description="character shingle length of the MinHash")
    recall_sample: int = Field(200, ge=0, description="kept and novelty-dropped prompts compared exhaustively to "
                               "measure the candidate stage's recall (0: not measured)")
    min_chars: int = Field(2, ge=0, description="drop a prompt or response shorter than this")
    max_chars: PositiveInt = Field(8000, description="drop a prompt or response longer than this")
    refusals: StrList = Field(default_factory=lambda: list(REFUSALS), description="regexes (case-insensitive) "
                              "that mark a response as a refusal")
    decontaminate_ngram: PositiveInt = Field(13, description="drop an example sharing a word n-gram of this length "
                                             "with the evaluation texts (a shorter evaluation text: whole)")
    pii: bool = Field(True, description="redact PII with data.pii's detectors before anything else sees the text")

    @model_validator(mode="after")
    def _bands(self) -> SynthFiltersConfig:
        if self.num_perm % self.bands:
            raise invalid(f"bands ({self.bands}) must divide num_perm ({self.num_perm})", at="bands")
        return self


class SynthConfig(Section):
    """`raylab synth`: generators -> endpoint (a Ray Data actor pool) -> filters -> synth/*.jsonl."""

    endpoint: EndpointConfig | None = Field(None, description="the OpenAI-compatible endpoint (required to run)")
    grounded_qa: GroundedQaConfig | None = Field(None, description="question/answer pairs from document chunks")
    self_instruct: SelfInstructConfig | None = Field(None, description="Self-Instruct from seed tasks")
    max_requests: PositiveInt = Field(1000, description="requests sent at most (cached answers are free); at the "
                                      "budget the run stops cleanly and keeps what it made")
    concurrency: PositiveInt = Field(4, description="request actors at once (each sends its batch one by one)")
    batch_size: PositiveInt = Field(8, description="requests per actor batch")
    decontaminate: StrList = Field(default_factory=list, description="evaluation files (JSONL: every string "
                                   "value; else lines) no example may overlap")
    filters: SynthFiltersConfig = Field(default_factory=SynthFiltersConfig, description="the filters")
