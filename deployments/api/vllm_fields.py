"""The fields of vLLM's own OpenAI request models, and what pdserve does with each.

pdserve's request models (`openai_models.py`) declare the fields pdserve honours. Any other field
of vLLM's `ChatCompletionRequest`/`CompletionRequest` is refused with a 400 naming it, unless it
is sent as null or at the value vLLM reads as "nothing asked" (its field default, or its neutral
sampling value: `presence_penalty: 0`), which is dropped as the no-op it is. A field vLLM does not
know either is refused as unknown. The README's field table is generated here (`field_table`;
`python -m pdserve.deployments.api.openai_models` prints it), and a test keeps the two equal, so
the table cannot drift from vLLM's models or pdserve's. `StrictBody` is the base of every pdserve
request model that applies this rule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, WrapValidator, create_model, model_validator
from pydantic_core import PydanticCustomError

from pdserve.deployments.api.openai_answers import ApiModel


@functools.cache
def vllm_request_models() -> dict[str, type[BaseModel]]:
    """vLLM's request model per API, as its OpenAI server validates bodies (and its
    `structured_outputs` parameters, a dataclass there, as a model)."""
    from vllm.entrypoints.generate.base.protocol import StreamOptions
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )
    from vllm.sampling_params import StructuredOutputsParams

    with warnings.catch_warnings():  # its field `json` shadows BaseModel.json, which nothing here calls
        warnings.simplefilter("ignore", UserWarning)
        structured = create_model("StructuredOutputsParams", **{f.name: (Any, f.default) for f in
                                                               dataclasses.fields(StructuredOutputsParams) if f.init})

    return {"chat": ChatCompletionRequest, "completions": CompletionRequest, "stream_options": StreamOptions,
            "tokenize_chat": TokenizeChatRequest, "tokenize_completion": TokenizeCompletionRequest,
            "detokenize": DetokenizeRequest, "structured_outputs": structured}


@functools.cache
def _no_op_values(api: str) -> dict[str, list[Any]]:
    """Per field of vLLM's `api` model, the values that ask for nothing: the field's default, and
    the neutral sampling value vLLM substitutes when the field is null."""
    model = vllm_request_models()[api]
    neutral = getattr(model.__private_attributes__.get("_DEFAULT_SAMPLING_PARAMS"), "default", None) or {}
    values: dict[str, list[Any]] = {}
    for name, info in model.model_fields.items():
        values[name] = [info.default] if info.default_factory is None else []  # a fresh request id asks something
        if name in neutral:
            values[name].append(neutral[name])
    return values


def asks_nothing(api: str | None, name: str, value: Any) -> bool:
    """Whether sending `value` for the field `name` of vLLM's `api` model is the same as leaving it
    out; with no vLLM model to go by, only null is."""
    return value is None or (api is not None and any(value == v for v in _no_op_values(api).get(name, ())))


def drop_no_ops(data: Any, declared: Iterable[str], api: str | None) -> Any:
    """A request body without the fields pdserve does not declare that ask for nothing; what is
    left undeclared is refused by the model (`extra="forbid"`, explained by `refusal`)."""
    if not isinstance(data, Mapping):
        return data
    declared = set(declared)
    return {k: v for k, v in data.items() if k in declared or not asks_nothing(api, k, v)}


def refusal(name: str) -> str:
    """Why an undeclared field was refused, and what the client may send instead."""
    if not any(name in model.model_fields for model in vllm_request_models().values()):
        return "unknown field"
    return ("vLLM's field, not supported by pdserve; leave it out, or send null or the value vLLM reads as "
            "unset (the README's field table lists them)")


def field_table(declared: Mapping[str, Iterable[str]], notes: Mapping[str, str]) -> str:
    """The Markdown table of every field of vLLM's chat and completions requests: honoured by
    pdserve, or accepted only as the no-op. `declared`: the fields pdserve's model of each API
    declares; `notes`: what a declared field does where that is not vLLM's meaning."""
    models = vllm_request_models()
    apis = ("chat", "completions")
    honoured = {api: set(declared[api]) for api in apis}
    names = sorted(set().union(*(models[api].model_fields for api in apis), *honoured.values()))
    rows = ["| field | /v1/chat/completions | /v1/completions |", "|---|---|---|"]
    for name in names:
        cells = [_cell(name, api, honoured[api], notes) for api in apis]
        rows.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _cell(name: str, api: str, honoured: set[str], notes: Mapping[str, str]) -> str:
    if name in honoured:
        return notes.get(name, "honoured" if name in vllm_request_models()[api].model_fields else "pdserve's")
    if name not in vllm_request_models()[api].model_fields:
        return "-"
    no_ops = [json.dumps(v) for v in _no_op_values(api)[name] if v is not None]
    return "refused unless " + " or ".join(["null", *dict.fromkeys(no_ops)])


class StrictBody(ApiModel):
    """Declared fields must have the documented JSON type; an undeclared one is refused unless
    it asks for nothing (then it is dropped)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    vllm_api: ClassVar[str | None] = None
    """The vLLM request model (`vllm_fields.vllm_request_models`) whose defaults ask for nothing."""

    @model_validator(mode="before")
    @classmethod
    def _drop_no_ops(cls, data: Any) -> Any:
        return drop_no_ops(data, cls.model_fields, cls.vllm_api)


def one_of(expected: str) -> WrapValidator:
    """Report a union's failure as one error on the field ("should be a string or ...") instead of
    one error per member type under made-up paths like `stop.list[str]`."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", "Input should be {expected}", {"expected": expected}) from None

    return WrapValidator(validate)
