"""A chat request's messages as pdserve takes them: the roles, text content or text parts, and
the tool calls and results they carry; each made into what the chat template takes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import model_validator
from pydantic_core import PydanticCustomError

from pdserve.deployments.api.tools import ToolCall
from pdserve.deployments.api.vllm_fields import StrictBody, one_of


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


MessageContent = Annotated[str | list[TextPart], one_of('a string or a list of {"type": "text", "text": ...} parts')]


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """`developer` is OpenAI's newer name for `system`, and reaches the chat template as `system`;
    `tool` carries a tool call's result."""
    content: MessageContent | None = None
    """Text, or text parts, joined with newlines as vLLM joins them; null only in an assistant
    message that made tool calls."""
    tool_calls: list[ToolCall] | None = None
    """An assistant message's calls."""
    tool_call_id: str | None = None
    """A tool message's answer is to this call."""

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("unsupported", "only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise PydanticCustomError("unsupported", "a tool message, and only one, names its tool_call_id")
        if self.content is None and not self.tool_calls:
            raise PydanticCustomError("unsupported", "content is null only in an assistant message with tool_calls")
        return self

    def as_template_dict(self) -> dict[str, Any]:
        """The message as the model's chat template takes it."""
        content = self.content if isinstance(self.content, str | None) else "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.as_template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message
