"""The structured-output constraint as the engines get it."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

from pdserve.prefill.structured import StructuredOutput


def test_each_engine_call_gets_its_own_params_as_vllm_rewrites_them():
    constraint = StructuredOutput(choice=["yes", "no"])
    first = constraint.vllm_params()
    validate_xgrammar_grammar(SamplingParams(structured_outputs=first))
    assert first.choice is None and first.grammar  # vLLM turned the choice into a grammar, in place
    assert constraint.vllm_params().choice == ["yes", "no"]


def test_vllms_options_travel_with_the_constraint():
    params = StructuredOutput(json_object=True, disable_any_whitespace=True).vllm_params()
    assert (params.json_object, params.disable_any_whitespace, params.json, params.regex) == (True, True, None, None)


@pytest.mark.parametrize("fields", [{}, {"json_object": False}, {"regex": "a", "grammar": 'root ::= "a"'}])
def test_exactly_one_constraint(fields):
    with pytest.raises(ValueError, match="exactly one constraint"):
        StructuredOutput(**fields)
