"""A client's prompt made into a validated `GenerateRequest`, and an answer's tokens back into
text, on the tokenizer's own thread: the ingress's one use of the tokenizer."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdserve.config.cluster import SLOConfig
from pdserve.controller.decision import SLO
from pdserve.deployments.prompt_limits import check_chars, check_text
from pdserve.errors import InvalidRequest
from pdserve.prefill.requests import GenerateRequest, Objectives, Sampling

log = logging.getLogger("pdserve.ingress")


class RequestBuilder:
    """Tokenizes and validates requests for one model: its tokenizer, context length and the
    service's default objectives."""

    def __init__(self, tokenizer: Any, max_model_len: int, slo: SLOConfig):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.slo = slo
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-tokenizer")

    async def chat(self, messages: list[dict[str, Any]], sampling: Sampling, carrier: dict[str, str] | None,
                   objectives: Objectives | None, tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        check_text(sampling.stop, "stop")
        ids = await self._on_thread(lambda m: self._chat_ids(m, tools=tools), messages)
        return self._checked(ids, sampling, carrier, objectives)

    async def completion(self, prompt: str | list[int], sampling: Sampling, carrier: dict[str, str] | None,
                         objectives: Objectives | None) -> GenerateRequest:
        check_text(sampling.stop, "stop")
        return self._checked(await self._on_thread(self._prompt_ids, prompt), sampling, carrier, objectives)

    async def tokenize(self, prompt: str | list[dict[str, str]], add_special_tokens: bool,
                       add_generation_prompt: bool) -> tuple[list[int], list[str]]:
        """What `chat`/`completion` would make of the prompt, and each token's string."""
        if isinstance(prompt, str):
            ids = await self._on_thread(lambda p: self._prompt_ids(p, add_special_tokens), prompt)
        else:
            ids = await self._on_thread(lambda m: self._chat_ids(m, add_generation_prompt), prompt)
        return list(ids), list(self.tokenizer.convert_ids_to_tokens(ids))

    async def detokenize(self, token_ids: list[int]) -> str:
        self._check_token_ids(token_ids, "tokens")
        return await self._on_thread(self.tokenizer.decode, token_ids)

    async def unsent_text(self, token_ids: list[int], sent: str, skip_special_tokens: bool = True) -> str:
        """The text of `token_ids` past the `sent` part of it: what vLLM held back for a stop string
        (see failover.ResumedText), decoded as the engine decoded it."""
        whole = await self._on_thread(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens),
                                      token_ids)
        if not whole.startswith(sent):
            log.warning("the text sent (%d chars) is not a prefix of its tokens' text; none carried", len(sent))
            return ""
        return whole[len(sent):].rstrip("\ufffd")  # an unfinished character completes on the new replica

    async def _on_thread(self, work: Callable[[Any], Any], arg: Any) -> Any:
        """`work(arg)` on the tokenizer's own thread: a long prompt takes a while, and on the event
        loop it would stall every stream of this replica meanwhile. One thread, because the
        tokenizer is not safe to call from several at once."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, arg)

    def _chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not messages:
            raise InvalidRequest("messages must hold at least one message", param="messages")
        if len(messages) > self.max_model_len:  # the template spends a token or more on each
            raise InvalidRequest(f"{len(messages)} messages cannot fit a context of {self.max_model_len} tokens",
                                 param="messages", code="context_length_exceeded")
        contents = [m["content"] for m in messages]
        check_text(contents, "messages")
        check_chars(sum(map(len, contents)), self.max_model_len, "messages")
        try:
            return list(self.tokenizer.apply_chat_template(messages, tools=tools,
                                                           add_generation_prompt=add_generation_prompt,
                                                           tokenize=True, return_dict=True)["input_ids"])
        except Exception as exc:  # a template that rejects these messages is the client's problem
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", param="messages") from None

    def _prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            check_text([prompt], "prompt")
            check_chars(len(prompt), self.max_model_len, "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if prompt else []
        self._check_token_ids(prompt, "prompt")
        return list(prompt)

    def _check_token_ids(self, token_ids: Iterable[int], field: str) -> None:
        """Token ids a request names must be the model's: vLLM would fail them inside the engine."""
        vocab = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"{field} token ids must lie in [0, {vocab}); got {bad[:5]}", param=field)

    def _checked(self, ids: list[int], sampling: Sampling, carrier: dict[str, str] | None,
                 objectives: Objectives | None) -> GenerateRequest:
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        self._check_token_ids(sampling.stop_token_ids, "stop_token_ids")
        self._check_token_ids(sampling.logit_bias, "logit_bias")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} "
                "tokens, leaving no room to generate", param="messages", code="context_length_exceeded")
        if sampling.max_tokens is None:
            sampling = sampling.model_copy(update={"max_tokens": room})
        elif sampling.max_tokens > room:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} "
                f"tokens and max_tokens asks for {sampling.max_tokens} more", param="max_tokens",
                code="context_length_exceeded")
        given, defaults = objectives or Objectives(), self.slo
        slo = SLO(ttft_ms=given.ttft_ms or defaults.ttft_ms, tpot_ms=given.tpot_ms or defaults.tpot_ms,
                  priority=defaults.priority if given.priority is None else given.priority)
        return GenerateRequest(uuid.uuid4().hex, ids, sampling, slo, dict(carrier or {}))
