"""OpenAI-shaped request and response bodies for `medtune serve` (pydantic; they also make /openapi.json).

Requests keep only what medtune serves. Fields other clients send that medtune does not use (presence_penalty,
logit_bias, user, ...) are ignored, as OpenAI-compatible servers commonly do; the ones it does read are checked
and a bad value is a 400 with an OpenAI error body.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop string (matching is incremental; the cap keeps the held-back tail short)
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = Field(False, description="send a last chunk with token usage and no choices")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, description="the base model's id or an adapter's name (see GET /v1/models)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (the default here); higher = more varied")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (with temperature > 0)")
    n: int = Field(1, ge=1, le=1, description="number of choices; only 1 is served")
    stream: bool = Field(False, description="send server-sent events (`data: {chunk}`), ending with `data: [DONE]`")
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage adds a usage chunk")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters; generation "
                          "ends before the first one")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed for sampling (with temperature > 0)")

    @field_validator("n", "seed", "max_tokens", "max_completion_tokens", mode="before", check_fields=False)
    @classmethod
    def _integral_float_to_int(cls, value):
        """Requests are validated strictly (no "true" for a bool, no true for a number), except that JSON's 1.0
        is an integer, as JSON Schema says."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant"] = Field(description="who wrote the message")
    content: str = Field(min_length=1, pattern=r"\S", description="the message text (not empty or only spaces)")


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(
        min_length=1, description="the conversation so far, with at least one user message",
        json_schema_extra={"contains": {"type": "object", "properties": {"role": {"const": "user"}}}})
    max_tokens: int | None = Field(None, ge=1, description="longest answer in tokens (capped by the server)")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens; wins if both are set")


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1, pattern=r"\S", description="the text to continue (no chat template is applied)")
    max_tokens: int | None = Field(16, ge=1, description="longest continuation in tokens (capped by the server)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """Also the shape of each streamed chunk of /v1/completions (finish_reason null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medtune"
    parent: str | None = Field(None, description="for an adapter: the base model it runs on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]
    queued: int = Field(description="requests waiting for the worker")
