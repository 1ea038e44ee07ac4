"""OpenAI's request, response and error shapes for the serve stage (no openai dependency).

Requests are pydantic models that forbid unknown keys, so a misspelt or unsupported
argument is a 400 naming it (as OpenAI's API answers), never silently ignored. Every error a
client can cause is an `ApiError` that renders as OpenAI's body:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # both engines apply them (decode.Sampling)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """A call an assistant message made (a conversation sent back with the tool's result)."""

    id: str = Field(min_length=1)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _shape(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is required (null only in an assistant message with tool_calls)")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message names its tool_call_id, and only a tool message does")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def rendered(self) -> dict:
        """The message as chat templates take it: the calls' arguments as objects (templates
        write them with tojson), the tool message's call id."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _parsed(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _parsed(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatExtension(_Strict):
    """The chat request's `raylab` extension field (docs/retrieval.md): retrieval off for this
    request, another number of chunks, or another search mode. Strict types: "no" is not
    false, "2" not 2."""

    retrieval: StrictBool | None = None  # None: on when the endpoint has an index (serve.rag)
    top_k: StrictInt | None = Field(None, ge=1)
    search: Literal["vector", "hybrid"] | None = None  # None: serve.rag.search


class JsonSchema(_Strict):
    """`response_format.json_schema`: OpenAI's named schema the answer must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    # `schema` is BaseModel's (deprecated) method name, hence the alias
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """Chat's `response_format`: plain text, any JSON object, or a JSON schema. Constrained
    decoding is the vLLM engine's (its structured outputs); the transformers engine answers
    a constraint with a 400 naming the engine."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema and only then")
        return self

    def constraint(self) -> dict | None:
        """The engine-neutral constraint ({"json": schema} | {"json_object": True}), None for text."""
        if self.type == "json_schema":
            return {"json": self.json_schema.schema_}
        return {"json_object": True} if self.type == "json_object" else None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    raylab: ChatExtension | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprobs_wanted(self) -> int | None:
        """The alternatives per token to return (0: the chosen token's own), None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] = False
    # the legacy API's logprobs: each token's logprob and its `logprobs` most likely
    # alternatives (OpenAI takes at most 5); the vLLM engine's, as chat's logprobs
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: None = None

    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings. Token-id inputs (OpenAI also takes lists of ints) are not
    supported: the ids would be another tokenizer's."""

    input: StrictStr | list[StrictStr]
    model: str = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)  # accepted only at the model's own dimension
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v):  # one message for every other shape (a union would name its members)
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return v
        raise ValueError("expected a string or a list of strings (token-id inputs are not supported)")


def parse(kind: type[BaseModel], raw: bytes) -> Any:
    """A request model from a body, or ApiError(400) naming the first bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {where}", where) from None
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{where}'", where, "missing_required_parameter") from None
        raise ApiError(400, f"Invalid value for '{where}': {err['msg']} (got {_short(err.get('input'))})", where,
                       "invalid_value") from None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, choices: list[dict], use: dict, chat: bool) -> dict:
    """The whole response. `choices`: [{index, text, finish_reason}], a chat choice's
    `tool_calls` (its content then null) and `logprobs` entries where asked."""
    if chat:
        shaped = [{"index": c["index"], "message": _message(c), "finish_reason": c["finish_reason"],
                   "logprobs": _logprobs(c.get("logprobs"))} for c in choices]
    else:
        shaped = [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
                   "logprobs": text_logprobs(c.get("logprobs"))} for c in choices]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": shaped, "usage": use}


def _message(choice: dict) -> dict:
    if choice.get("tool_calls"):  # a forced call's text is its arguments; an auto call's may have some around it
        return {"role": "assistant", "content": choice.get("content"), "tool_calls": choice["tool_calls"]}
    return {"role": "assistant", "content": choice["text"]}


def _logprobs(entries: list[dict] | None) -> dict | None:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}, or
    None when the request asked none."""
    return None if entries is None else {"content": entries, "refusal": None}


def text_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """A completion choice's legacy `logprobs` from chat-style entries: tokens, token_logprobs,
    top_logprobs ({token: logprob} of the alternatives) and text_offset, each token's first
    character in the choice's text counted over the token strings, as vLLM counts (`offset`:
    where these entries start, for a stream's later events); None when none were asked."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def chunk(rid: str, model: str, index: int, text: str | None, finish: str | None, chat: bool,
          role: bool = False, logprobs: list[dict] | None = None, offset: int = 0) -> dict:
    """One server-sent event's data for one choice (`offset`: a completion's text_offset so far)."""
    if chat:
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": _logprobs(logprobs)}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish,
                  "logprobs": text_logprobs(logprobs, offset)}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, use: dict, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": use}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
