"""The `synth:` section: `raylab synth CONFIG` generates training examples through an
OpenAI-compatible endpoint and filters them (docs/synth.md).

    synth:
      endpoint: {base_url: http://127.0.0.1:8000/v1, model: acme-assistant, api_key: ${env:SYNTH_KEY}
      grounded_qa: {data_run: runs/acme}           # or files: [handbook/*.md]
      self_instruct: {seeds: ["Write a haiku about widgets.", ...], instructions: 200}
      evol_instruct: {seeds: ["Explain our returns policy."], rounds: 4}
      filters: {judge: {min_score: 4}            # optional: the endpoint grades each example 1-5
      max_requests: 2000

Without `endpoint`, raylab's own endpoint is used: serve.host/serve.port, model
<registry.model_name>@production (synth/client.py, `resolve_endpoint`).
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
    '{"pairs": [{"question": "...", "answer": "..."}]}'
)
INSTRUCTION_PROMPT = (
    "Come up with a series of tasks. Here are examples of tasks:\n\n{examples}\n\n"
    "Write {n} new task instruction(s), different from these and from each other. Reply with only a JSON "
    'object, no other text: {"instructions": ["...", "..."]}'
)
OUTPUT_PROMPT = (
    "Task: {instruction}\n\n"
    "If the task needs an input (a text to work on, a list, numbers), write one; otherwise leave it empty. "
    "Then write the correct output for the task. Reply with only a JSON object, no other text: "
    '{"input": "...", "output": "..."}'
)
# Evol-Instruct (Xu et al., 2023, "WizardLM"): the paper's in-depth rewriter prompt and its
# four in-depth methods, and its in-breadth creator prompt, asking for JSON like the others.
EVOL_DEPTH_PROMPT = (
    "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more complex "
    "version to make famous AI systems (e.g., ChatGPT and GPT-4) a bit harder to handle. But the rewritten prompt "
    "must be reasonable and must be understood and responded to by humans. Your rewriting cannot omit the "
    "non-text parts such as the table and code in the given prompt, nor its input. You SHOULD complicate the "
    "given prompt using the following method:\n{method}\n"
    "Try your best not to make the rewritten prompt verbose: it can only add 10 to 20 words to the given prompt. "
    "The phrases 'given prompt' and 'rewritten prompt' must not appear in it.\n\n"
    "The given prompt:\n{instruction}\n\n"
    'Reply with only a JSON object, no other text: {"instruction": "the rewritten prompt"}'
)
EVOL_DEPTH_METHODS = {
    "constraints": "Add one more constraint or requirement to the given prompt.",
    "deepen": "If the given prompt contains inquiries about certain issues, increase the depth and breadth of "
              "the inquiry.",
    "concretize": "Replace general concepts with more specific concepts.",
    "reasoning": "If the given prompt can be solved with just a few simple thinking processes, rewrite it to "
                 "explicitly request multiple-step reasoning.",
}
EVOL_BREADTH_PROMPT = (
    "I want you to act as a Prompt Creator. Your goal is to draw inspiration from the given prompt to create a "
    "brand new prompt. The new prompt should belong to the same domain as the given prompt but be even more "
    "rare. Its length and complexity should be similar to those of the given prompt. It must be reasonable and "
    "must be understood and responded to by humans. The phrases 'given prompt' and 'created prompt' must not "
    "appear in it.\n\n"
    "The given prompt:\n{instruction}\n\n"
    'Reply with only a JSON object, no other text: {"instruction": "the created prompt"}'
)
EVOL_ANSWER_PROMPT = (
    "{instruction}\n\n"
    'Reply with only a JSON object, no other text: {"response": "your complete answer"}'
)
# The paper's eliminator: an evolved instruction "obviously copies some words from the evolving
# prompt, such as 'given prompt', 'rewritten prompt', '#Rewritten Prompt#'".
EVOL_COPY_MARKERS = ["given prompt", "rewritten prompt", "created prompt", "#rewritten prompt#", "#given prompt#",
                     "#created prompt#", "prompt rewriter", "prompt creator"]
# The judge (the filters' optional last step): a 1-5 rubric, as in AlpaGasus / LLM-as-a-judge.
JUDGE_PROMPT = (
    "You are grading training data. Grade the response to the instruction below on a scale of 1 to 5:\n"
    "5: correct, complete, helpful and clearly written;\n"
    "4: correct and helpful, with minor gaps or wording problems;\n"
    "3: partly answers the instruction, or has a minor error;\n"
    "2: mostly unhelpful, or has a significant error;\n"
    "1: wrong, irrelevant, a refusal, or not an answer to the instruction.\n\n"
    "Instruction:\n{instruction}\n\nResponse:\n{response}\n\n"
    'Reply with only a JSON object, no other text: {"score": 1-5 as an integer, "reason": "one sentence"}'
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
    index: PathOrUri | None = Field(
        None, description="an index directory `raylab index` built (index.directory, default <output_dir>/index): "
        "its chunks are the chunks, id the index's chunk_id")
    files: StrList = Field(default_factory=list, description="plain text files (.txt/.md); each paragraph (blank-"
                           "line separated) is a chunk, id FILE#N")
    org: str | None = Field(
        None, min_length=1, description="ask only about chunks this organisation may read, by the serving search's "
        "rule (an index's chunk org/acl; a data run's source org/acl from its config.resolved.yaml): chunks without "
        "an org, its own, and those whose acl names it; default none: only chunks without an org")
    pairs_per_chunk: PositiveInt = Field(2, description="question/answer pairs asked for per chunk ({n})")
    max_chunks: PositiveInt | None = Field(None, description="use the first N chunks (by id); default all")
    min_chunk_chars: int = Field(80, ge=0, description="skip shorter chunks (headings, signatures)")
    prompt: str = Field(GROUNDED_QA_PROMPT, description="the prompt: {chunk} and {n} are filled in; the answer "
                        'must be {"pairs": [{"question", "answer"}]}')

    @model_validator(mode="after")
    def _some_input(self) -> GroundedQaConfig:
        if self.data_run is None and self.index is None and not self.files:
            raise invalid("give data_run (a run directory the data stage wrote), index (an index directory "
                          "`raylab index` built) or files (text files)", at="files")
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


class EvolInstructConfig(Section):
    """Evol-Instruct (Xu et al., 2023): each round rewrites every instruction of the pool by one
    evolution drawn at random (an in-depth method, or in-breadth), answers the survivors, and
    eliminates failed evolutions by the paper's rules (docs/synth.md)."""

    seeds: StrList = Field(default_factory=list, description="instructions to evolve, inline")
    seed_file: PathOrUri | None = Field(None, description="JSONL of {instruction} (other keys ignored) or a text "
                                        "file with one instruction per line")
    rounds: PositiveInt = Field(4, description="evolution rounds (the paper: 4); round r+1 evolves round r's "
                                "survivors, and a failed evolution's source again")
    seed: int = Field(0, description="which evolution each instruction gets in each round")
    depth_prompt: str = Field(EVOL_DEPTH_PROMPT, description="the in-depth rewriter: {method} and {instruction} "
                              'are filled in; the answer must be {"instruction": "..."}')
    depth_methods: dict[str, str] = Field(default_factory=lambda: dict(EVOL_DEPTH_METHODS), description="the "
                                          "in-depth methods, name -> text for {method} (the paper's four: "
                                          "constraints, deepen, concretize, reasoning)")
    breadth: bool = Field(True, description="draw in-breadth evolution too (one choice among the depth methods "
                          "+ 1)")
    breadth_prompt: str = Field(EVOL_BREADTH_PROMPT, description="the in-breadth creator: {instruction} is filled "
                                'in; the answer must be {"instruction": "..."}')
    answer_prompt: str = Field(EVOL_ANSWER_PROMPT, description="asks for the evolved instruction's response: "
                               '{instruction} is filled in; the answer must be {"response": "..."}')
    copy_markers: StrList = Field(default_factory=lambda: list(EVOL_COPY_MARKERS), description="an evolved "
                                  "instruction containing one of these (case-insensitive) copies the evolving "
                                  "prompt and is eliminated (`copies_prompt`)")
    short_answer_words: PositiveInt = Field(80, description="a response matching a refusal pattern with fewer "
                                            "words than this is eliminated (`refusal`; the paper: 'sorry' and "
                                            "under 80 words)")

    @model_validator(mode="after")
    def _prompts(self) -> EvolInstructConfig:
        if not self.seeds and self.seed_file is None:
            raise invalid("give seeds (inline) or seed_file", at="seeds")
        if not self.depth_methods and not self.breadth:
            raise invalid("no evolution to draw: give depth_methods or set breadth: true", at="depth_methods")
        if "breadth" in self.depth_methods:
            raise invalid("'breadth' names the in-breadth evolution; give the depth method another name",
                          at="depth_methods")
        for key, prompt, fields in (("depth_prompt", self.depth_prompt, ("{method}", "{instruction}")),
                                    ("breadth_prompt", self.breadth_prompt, ("{instruction}",)),
                                    ("answer_prompt", self.answer_prompt, ("{instruction}",))):
            for f in fields:
                if f not in prompt:
                    raise invalid(f"the prompt must contain {f}", at=key)
        return self


class JudgeConfig(Section):
    """The optional judge filter: the same endpoint grades each example 1-5 with a rubric."""

    min_score: int = Field(4, ge=1, le=5, description="keep examples graded at least this")
    prompt: str = Field(JUDGE_PROMPT, description="the rubric: {instruction} and {response} are filled in; the "
                        'answer must be {"score": 1..5, "reason": "..."}')

    @model_validator(mode="after")
    def _fields(self) -> JudgeConfig:
        for f in ("{instruction}", "{response}"):
            if f not in self.prompt:
                raise invalid(f"the prompt must contain {f}", at="prompt")
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
    judge: JudgeConfig | None = Field(None, description="grade every example that passed the other filters "
                                      "through the endpoint, keep >= min_score (off by default: one more request "
                                      "per example)")

    @model_validator(mode="after")
    def _bands(self) -> SynthFiltersConfig:
        if self.num_perm % self.bands:
            raise invalid(f"bands ({self.bands}) must divide num_perm ({self.num_perm})", at="bands")
        return self


class SynthConfig(Section):
    """`raylab synth`: generators -> endpoint (a Ray Data actor pool) -> filters -> synth/*.jsonl."""

    endpoint: EndpointConfig | None = Field(None, description="the OpenAI-compatible endpoint; default raylab's "
                                            "own: http://<serve.host>:<serve.port>/v1, model "
                                            "<registry.model_name>@production, the first key of "
                                            "serve.api_keys_env when set")
    grounded_qa: GroundedQaConfig | None = Field(None, description="question/answer pairs from document chunks")
    self_instruct: SelfInstructConfig | None = Field(None, description="Self-Instruct from seed tasks")
    evol_instruct: EvolInstructConfig | None = Field(None, description="Evol-Instruct: instructions evolved in "
                                                     "depth and breadth, with the paper's eliminator")
    max_requests: PositiveInt = Field(1000, description="requests sent at most (cached answers are free); at the "
                                      "budget the run stops cleanly and keeps what it made")
    concurrency: PositiveInt = Field(4, description="request actors at once (each sends its batch one by one)")
    batch_size: PositiveInt = Field(8, description="requests per actor batch")
    decontaminate: StrList = Field(default_factory=list, description="evaluation files (JSONL: every string "
                                   "value; else lines) no example may overlap")
    filters: SynthFiltersConfig = Field(default_factory=SynthFiltersConfig, description="the filters")
