"""The request body of OpenAI's Responses API (`POST /v1/responses`) and its translation into the
conversation the generation path takes (OpenAI's chat roles). What Tiffin does not serve is
refused by name: hosted tools (web search, file search...), `reasoning`, `include`, image and
file inputs, `truncation: "auto"`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from handlers.openai_requests import INT32_MAX
from runtime.engines.schema_limits import SchemaTooComplex, check_schema

TEXT_PARTS = ("input_text", "output_text", "text")


class Item(BaseModel):
    # Items a client sends back from an earlier response carry its ids and statuses.
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    status: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text", "text", "input_image", "input_file"]
    text: str = ""
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class MessageItem(Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always match: they are decoded under the schema


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def schema_within_limits(self) -> TextFormat:
        if self.type == "json_schema":
            if self.schema_ is None:
                raise ValueError("a json_schema format needs its schema")
            try:
                check_schema(self.schema_)
            except SchemaTooComplex as exc:
                raise ValueError(str(exc)) from None
        return self


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None

    @property
    def max_tokens(self) -> int | None:  # what handlers.parsing.sampling reads
        return self.max_output_tokens

    def openai_tools(self) -> list[dict[str, Any]] | None:
        """The tools in chat completions' shape, which the generation path takes."""
        if not self.tools:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description or "",
                    "parameters": tool.parameters or {"type": "object", "properties": {}},
                },
            }
            for tool in self.tools
        ]

    def openai_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, NamedFunction):
            return {"type": "function", "function": {"name": choice.name}}
        return choice


def conversation(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as chat messages: a string is one user turn; consecutive function calls are
    one assistant turn's tool_calls, and their outputs tool messages."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for position, item in enumerate(body.input):
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text(item, position)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


class UnsupportedInput(ValueError):
    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(message)


def _text(item: MessageItem, position: int) -> str:
    if isinstance(item.content, str):
        return item.content
    for index, part in enumerate(item.content):
        if part.type not in TEXT_PARTS:
            raise UnsupportedInput(
                f"input.{position}.content.{index}", f"{part.type} is not supported by this model"
            )
    return "".join(part.text for part in item.content)
