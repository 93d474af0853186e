"""Function calling: the tools a chat request offers, the call it forces, and the answer read back
as tool calls.

A forced call (`tool_choice: "required"` or a named function) is served as vLLM serves it: the
answer is held by structured outputs to the JSON schema vLLM builds from the tools (its own
`get_json_schema_from_tools`), so the call is well formed whatever the model; the JSON is then read
back as the calls. `tool_choice: "auto"` lets the model decide in its own syntax, which only the
model family's tool parser reads (`deployments/tool_parsing.py`): a service without one refuses
"auto" (OpenAI's default when tools are given), never answering text that silently ignored the tools.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from pdserve.deployments.api.vllm_fields import StrictBody
from pdserve.errors import InvalidRequest

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for a function's name."""


class FunctionDefinition(StrictBody):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema; none: the function takes no arguments."""
    strict: bool | None = None
    """OpenAI's switch for exact schema adherence: structured outputs hold a forced call to the schema either way."""


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    """Call this function."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(StrictBody):
    name: str
    arguments: str
    """The arguments as JSON text, as the model wrote them."""


class ToolCall(StrictBody):
    """A call an earlier assistant message made."""

    id: str
    type: Literal["function"]
    function: CalledFunction

    def as_template_dict(self) -> dict[str, Any]:
        """The call as chat templates take it: arguments as an object where they are JSON, as
        vLLM hands them over."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


@dataclass(frozen=True)
class ForcedCall:
    """How to read a forced call's answer: a named function's arguments, or vLLM's list of
    `{"name", "parameters"}` objects for "required"."""

    name: str | None
    """The named function; None: "required", any of the tools."""

    def calls(self, text: str) -> list[tuple[str, str]] | None:
        """(name, arguments as JSON text) of each call in the answer. A named call's arguments are
        the answer's text as it is, as a stream sends them (cut short by max_tokens too, as in
        vLLM); "required" answers None when its text is not the JSON list (cut short)."""
        if self.name is not None:
            return [(self.name, text)]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, list) or not all(isinstance(c, dict) and "name" in c for c in value):
            return None
        return [(str(c["name"]), json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in value]


def call_id() -> str:
    """A tool call's id, as vLLM makes them."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def forced_call(tools: list[Tool] | None, tool_choice: ToolChoice | None,
                parallel_tool_calls: bool | None) -> tuple[ForcedCall | None, dict[str, Any] | None]:
    """The call a request forces and the JSON schema that holds its answer to it (vLLM's); (None,
    None) when it forces none ("none", and "auto", where the model decides). InvalidRequest for a
    choice without tools, or one that names no offered tool."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return None, None
    if not tools:
        raise InvalidRequest(f"tool_choice {_shown(tool_choice)} needs tools", param="tool_choice")
    if tool_choice == "auto":
        return None, None
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    vllm_tools = [ChatCompletionToolsParam.model_validate(t.model_dump(exclude_none=True)) for t in tools]
    choice: Any = tool_choice
    name = None
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in {t.function.name for t in tools}:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        choice = ChatCompletionNamedToolChoiceParam.model_validate(tool_choice.model_dump())
    try:
        schema = get_json_schema_from_tools(choice, vllm_tools, parallel_tool_calls)
    except Exception as exc:  # vLLM's own checks of the tools ($defs that clash, ...)
        raise InvalidRequest(f"tools cannot be served: {exc}", param="tools") from None
    assert isinstance(schema, dict)
    return ForcedCall(name), schema


def _shown(tool_choice: ToolChoice) -> str:
    return f"'{tool_choice}'" if isinstance(tool_choice, str) else f"function {tool_choice.function.name!r}"
