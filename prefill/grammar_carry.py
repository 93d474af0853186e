"""A structured answer's grammar goes on where the answer goes on.

vLLM keeps a structured-output request's grammar state (which tokens may come next) in the
engine core's scheduler, from the request's first output token on. An answer continued on another
engine (the prefill engine sampled its first token, or the replica serving it died) reaches that
engine with its first k tokens at the end of the prompt, where a fresh grammar would have the
answer start over (a second `{`). vLLM loads its general plugins in each of its processes (the
`vllm.general_plugins` entry point, pyproject.toml); this one wraps the scheduler's grammar
compilation, so that a request whose `extra_args` hold `pdserve_sampled_tokens: k` has its grammar
accept the prompt's last k tokens first: the state one uninterrupted run has after them. Tokens
the grammar refuses fail the request (as a grammar that does not compile does) rather than let it
run unconstrained. Requests without the entry, pdserve's or not, are left as they are.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pdserve.prefill.requests import SAMPLED_TOKENS_KEY

log = logging.getLogger("pdserve.engine")

ENTRY_POINT = "pdserve_grammar_carry"
"""This plugin's name under `vllm.general_plugins`: engine replicas check that it is installed."""


def register() -> None:
    """vLLM's plugin hook, called once or more in each of its processes."""
    from vllm.v1.structured_output import StructuredOutputManager

    if not getattr(StructuredOutputManager._create_grammar, "pdserve_wrapped", False):
        StructuredOutputManager._create_grammar = continuing_grammar(StructuredOutputManager._create_grammar)


def continuing_grammar(original):
    """`StructuredOutputManager._create_grammar`, moved past an answer's earlier tokens."""

    @functools.wraps(original)
    def _create_grammar(self: Any, request: Any) -> Any:
        grammar = original(self, request)
        sp = request.sampling_params
        steps = int((sp.extra_args or {}).get(SAMPLED_TOKENS_KEY, 0)) if sp is not None else 0
        if steps > 0:
            earlier = list(request.prompt_token_ids[-steps:])
            if not grammar.accept_tokens(request.request_id, earlier):
                raise ValueError(f"request {request.request_id}: its earlier {steps} tokens do not fit its grammar")
            log.debug("request %s: grammar moved past its %d earlier tokens", request.request_id, steps)
        return grammar

    _create_grammar.pdserve_wrapped = True
    return _create_grammar
