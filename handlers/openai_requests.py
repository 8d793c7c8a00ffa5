"""Wire types of the OpenAI-compatible API: request validation (pydantic) and nothing else."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.engines.schema_limits import SchemaTooComplex, check_schema

# The sampling ranges, shared with the Ollama API's `options` (handlers/ollama_api.py).
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepeatPenalty = Annotated[float, Field(gt=0.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
# Counts end up in C ints (llama.cpp) and int32 protobuf fields: bounded so that 2**64 is a 400,
# not an overflow deep in an engine.
INT32_MAX = 2**31 - 1
TopK = Annotated[int, Field(ge=0, le=INT32_MAX)]
Tokens = Annotated[int, Field(ge=1, le=INT32_MAX)]


class Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do, so clients that
    # send newer parameters keep working. No float may be NaN or infinite: JSON bodies cannot
    # carry one (runtime/client_json.py), but gRPC's doubles can, and `gt=0` alone lets inf by.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        if self.type == "json_schema" and self.json_schema is not None:
            try:
                check_schema(self.json_schema.schema_)
            except SchemaTooComplex as exc:  # a 400 naming response_format, before any engine
                raise ValueError(f"json_schema.schema: {exc}") from None
        return self


class Sampling(Request):
    """The sampling parameters (OpenAI's, with llama.cpp's extensions) in their ranges; the
    Ollama API's `options` (handlers/ollama_api.py) take the same ones."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None


class SamplingFields(Sampling):
    """Parameters shared by chat and text completions."""

    model: str = Field(min_length=1)
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(Request):
    type: Literal["text"]
    text: str


class ImagePart(Request):
    """An image content part: parsed so that a model without vision can refuse it by name."""

    type: Literal["image_url", "input_image", "image"]
    image_url: Any = None


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def tool_result_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_parts(self) -> list[int]:
        """Where this message's image parts are."""
        if not isinstance(self.content, list):
            return []
        return [i for i, part in enumerate(self.content) if isinstance(part, ImagePart)]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: Tokens | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None

    @model_validator(mode="after")
    def supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (candidates are not ranked)")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(Request):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def no_empty_strings(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if any(item == "" for item in items):
            raise ValueError("input must not contain empty strings")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
