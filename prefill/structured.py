"""Structured outputs: an answer held to a JSON schema, to any JSON object, to a regex, to one of
some strings or to a grammar, by vLLM's own structured-output engine (xgrammar).

The constraint is checked where the request enters, by vLLM's own xgrammar check, so that a
schema the engine cannot compile is the client's 400, not a failed generation. The engines use
xgrammar alone (`prefill/engine.py`), so what passes here compiles there. An answer continued on
another engine has its grammar moved past its earlier tokens there (`grammar_carry.py`).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

BACKEND = "xgrammar"
"""The engines' structured-output backend: the one this module's check is vLLM's check for."""
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
_XGRAMMAR_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
"""xgrammar's errors start with a time and a C++ source line: of no use to a client."""


class StructuredOutput(BaseModel):
    """One constraint on the answer's text, and vLLM's options for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None
    """The answer is a JSON value of this JSON schema."""
    json_object: bool = False
    """The answer is a JSON object, any object."""
    regex: str | None = None
    """The answer matches this regular expression."""
    choice: list[str] | None = Field(None, min_length=1)
    """The answer is one of these strings."""
    grammar: str | None = Field(None, min_length=1)
    """The answer is a sentence of this grammar (EBNF, or Lark as vLLM reads it)."""
    disable_any_whitespace: bool = False
    """JSON without whitespace between its tokens (vLLM's option)."""
    disable_additional_properties: bool = False
    """Objects of the schema may not hold properties it does not name (vLLM's option)."""
    whitespace_pattern: str | None = None
    """The regex JSON whitespace must match (vLLM's option; xgrammar ignores it)."""

    @model_validator(mode="after")
    def _one_constraint_xgrammar_compiles(self) -> StructuredOutput:
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one constraint of {', '.join(CONSTRAINTS)}; got {given or 'none'}")
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

        try:  # vLLM rewrites a choice into a grammar while checking it: give it its own copy
            validate_xgrammar_grammar(SamplingParams(structured_outputs=self.vllm_params()))
        except (ValueError, VLLMValidationError) as exc:
            raise ValueError(f"{given[0]} cannot be served: {_XGRAMMAR_LOG_PREFIX.sub('', str(exc))}") from None
        return self

    def vllm_params(self) -> Any:
        """vLLM's `StructuredOutputsParams` for an engine call (a new one each time: vLLM writes
        its backend's name into it)."""
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(
            json=self.json_schema, json_object=self.json_object or None, regex=self.regex,
            choice=list(self.choice) if self.choice is not None else None, grammar=self.grammar,
            disable_any_whitespace=self.disable_any_whitespace,
            disable_additional_properties=self.disable_additional_properties,
            whitespace_pattern=self.whitespace_pattern)
