"""The requests the disaggregated-versus-colocated test sends through both modes: greedy,
seeded, each sampling parameter whose state crosses from the prefill engine to the decode engine,
structured outputs and tool calls. Their order is what the test's assertions index."""

from __future__ import annotations

SMOLLM2_CALL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'
"""A call as the SmolLM2 family writes it."""


def sampling_requests(model: str, prompts: list[str], tokenizer) -> tuple[list[dict], dict]:
    """Every case, in order, and the seeded request that `n` choices are compared against."""
    requests = [{"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": 32, "temperature": 0}
                for p in prompts]
    # Seeded sampling too: the first token sampled on the prefill engine, the rest on the decode
    # engine, whose generator skips the first token's draw, as one engine's run would.
    requests += [{**kw, "temperature": 1.0, "seed": 11} for kw in requests[:2]]
    sampled = {**requests[0], "temperature": 1.0, "seed": 11, "max_tokens": 24}
    blue, eos = tokenizer.encode(" blue", add_special_tokens=False)[0], tokenizer.eos_token_id
    weather = {**requests[0], "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
               "max_tokens": 40, "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                   "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}
    requests += [
        {**sampled, "top_k": 1},  # sampling among one token is greedy
        {**sampled, "min_p": 1.0},  # so is keeping only the likeliest
        {**sampled, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.3},
        {**requests[0], "logit_bias": {str(blue): 100}, "max_tokens": 6},  # " blue" every time
        # The prefill engine's first token is the stop token: the answer ends there, empty.
        {**requests[0], "logit_bias": {str(blue): 100}, "stop_token_ids": [blue]},
        # End of sequence as likely as can be, held off for 5 tokens: on the prefill engine for
        # its one, then the decode engine for the 4 left (a carried-over 5 would make 6).
        {**sampled, "logit_bias": {str(eos): 100}, "min_tokens": 5},
        # " blue" favoured, until the penalties for its earlier uses (the prefill engine's first
        # among them: the decode engine must count it) outweigh the bias.
        {**requests[0], "logit_bias": {str(blue): 20}, "presence_penalty": 2.0, "frequency_penalty": 2.0,
         "max_tokens": 16},
        {**sampled, "presence_penalty": 1.5, "frequency_penalty": -0.5},
        {**requests[1], "logprobs": True, "top_logprobs": 3},  # the first token's from the prefill engine
        {**sampled, "logprobs": True},
        # Structured: the prefill engine samples the first token ({) under the grammar, the decode
        # engine's grammar goes on after it.
        {**requests[0], "messages": [{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
         "max_tokens": 50, "response_format": {"type": "json_schema", "json_schema": {"name": "capital", "schema": {
             "type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
             "required": ["country", "capital"], "additionalProperties": False}}}},
        {**sampled, "response_format": {"type": "json_object"}},
        {**requests[1], "structured_outputs": {"choice": ["red", "green", "blue"]}},
        # Forced tool calls: held to the function's schema (named) or vLLM's schema of the tools.
        {**weather, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {**weather, "tool_choice": "required", "parallel_tool_calls": False},
        # tool_choice "auto" (implied by tools): the model's own choice, read by its family's
        # parser (xlam for SmolLM2). This model's template does not show it the tools, so it
        # answers in text; held to its family's call syntax, the same parser reads the call.
        weather,
        {**weather, "structured_outputs": {"choice": [SMOLLM2_CALL]}, "max_tokens": 60},
        # Special tokens kept in the text (tool-call parsers that look for them need them).
        {**requests[0], "logit_bias": {str(tokenizer.bos_token_id): 100}, "max_tokens": 3,
         "skip_special_tokens": False},
    ]

    return requests, sampled


def streamed_calls(c, kw: dict) -> tuple[dict[int, tuple[str, str]], str]:
    """A streamed answer's tool calls put together from their pieces, and its finish reason."""
    vllms = {"structured_outputs": kw.pop("structured_outputs")}
    pieces: dict[int, tuple[str, str]] = {}
    finish_reason = ""
    for chunk in c.chat.completions.create(**kw, extra_body=vllms):
        for call in chunk.choices[0].delta.tool_calls or []:
            name, arguments = pieces.get(call.index, ("", ""))
            pieces[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return pieces, finish_reason
