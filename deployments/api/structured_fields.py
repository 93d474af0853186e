"""The request fields that ask for structured outputs: OpenAI's `response_format` and vLLM's
`structured_outputs` (the constraint they become: `prefill/structured.py`)."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from pdserve.deployments.api.vllm_fields import StrictBody
from pdserve.errors import InvalidRequest


class JsonSchemaFormat(StrictBody):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    """The JSON schema the answer follows."""
    strict: bool | None = None
    """OpenAI's switch for exact schema adherence: xgrammar holds the answer to the schema either way."""


class ResponseFormat(StrictBody):
    """OpenAI's answer format: free text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    """With type json_schema, and only then."""

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("unsupported", "json_schema is given with type json_schema, and only then")
        return self


class StructuredOutputsBody(StrictBody):
    """vLLM's `structured_outputs`: one constraint (json, json_object, regex, choice or grammar)
    and vLLM's options for it."""

    vllm_api: ClassVar[str | None] = "structured_outputs"
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    """A JSON schema, as an object or its JSON text."""
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """EBNF, or Lark as vLLM reads it."""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def constraint(self) -> dict[str, Any]:
        """The fields of `StructuredOutput`; InvalidRequest when `json` is text that is not JSON."""
        schema = self.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"Invalid 'structured_outputs.json': not JSON ({exc})",
                                     param="structured_outputs.json") from None
        values = {**self.model_dump(exclude={"json_"}), "json_schema": schema}
        return {k: v for k, v in values.items() if v is not None}
