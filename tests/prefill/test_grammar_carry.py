"""The grammar carry: a structured answer continued on a new engine has its grammar moved past the
answer's earlier tokens (now the end of the prompt), as one uninterrupted run's grammar is. The
grammars are real (xgrammar, compiled for the default model's tokenizer, in vLLM's grammar
class); the request is a stand-in holding only the fields the plugin reads. (Real engines:
tests/kvtransfer/test_connector_e2e.py.)"""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import xgrammar as xgr
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

from pdserve.model_store import resolve_model
from pdserve.prefill import grammar_carry
from pdserve.prefill.requests import SAMPLED_TOKENS_KEY

SCHEMA = '{"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_model(None)))


@pytest.fixture(scope="module")
def compiled(tokenizer):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    return xgr.GrammarCompiler(info).compile_json_schema(SCHEMA)


def _create_grammar(compiled, tokenizer):
    """The wrapped original: a fresh grammar, as vLLM's xgrammar backend compiles one."""
    return lambda manager, request: XgrammarGrammar(vocab_size=len(tokenizer), matcher=xgr.GrammarMatcher(compiled),
                                                    ctx=compiled)


def _request(prompt: list[int], sampled_tokens: int):
    extra = {SAMPLED_TOKENS_KEY: sampled_tokens} if sampled_tokens else None
    return SimpleNamespace(request_id="r", prompt_token_ids=prompt, sampling_params=SamplingParams(extra_args=extra))


def test_the_grammar_goes_on_after_the_answers_earlier_tokens(compiled, tokenizer):
    create = grammar_carry.continuing_grammar(_create_grammar(compiled, tokenizer))
    answer = tokenizer.encode('{"capital": "Paris"}')
    prompt = tokenizer.encode("The capital of France, in JSON:")
    opening, rest = answer[:3], answer[3:]

    fresh = create(None, _request(prompt + opening, sampled_tokens=0))
    assert fresh.validate_tokens(answer) == answer and fresh.validate_tokens(rest) == []

    carried = create(None, _request(prompt + opening, sampled_tokens=len(opening)))
    assert carried.validate_tokens(rest) == rest and carried.validate_tokens(answer) == []
    assert carried.num_processed_tokens == len(opening)


def test_earlier_tokens_the_grammar_refuses_fail_the_request(compiled, tokenizer):
    create = grammar_carry.continuing_grammar(_create_grammar(compiled, tokenizer))
    not_json = tokenizer.encode("Paris")
    with pytest.raises(ValueError, match="do not fit its grammar"):
        create(None, _request(not_json, sampled_tokens=len(not_json)))


def test_the_plugin_is_installed_for_vllm_and_wraps_once():
    assert grammar_carry.ENTRY_POINT in {e.name for e in entry_points(group="vllm.general_plugins")}
    grammar_carry.register()
    wrapped = StructuredOutputManager._create_grammar
    grammar_carry.register()
    assert StructuredOutputManager._create_grammar is wrapped and wrapped.pdserve_wrapped
