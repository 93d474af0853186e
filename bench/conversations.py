"""Conversation workloads for `pdserve bench serve`: chats of several turns, the traffic that
prefix-aware routing exists for.

Each turn's prompt is the whole conversation so far (its system prompt, the earlier messages and
the answers the service gave) plus a new message; it is sent a think time after the previous
answer ended, and names its conversation (`user`), as a chat client would. Conversations start
open loop (a Poisson process scaled to the run's rate); turns within one are closed loop.
Answers come back as text and are tokenized again for the next prompt, as a client sending the
history as text causes: where that differs from the tokens the engine generated, the cache holds
the history only up to there.

Built-in workloads take their turn counts and lengths from a published dataset (`source` says
which and what is ours); a YAML/JSON file with `kind: conversation` and the same fields is one too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.bench.loadgen import RequestResult, RequestSpec, completions_url, http_client, send
from pdserve.bench.workloads import AnyWorkload, LengthDist, load_workload


class ConversationWorkload(BaseModel):
    """Conversations: how many turns, how long each message and answer, how long users think."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["conversation"] = "conversation"
    """Marks a workload file as conversations rather than single requests."""
    name: str
    source: str
    """Where the parameters come from, so a reader can judge how realistic they are."""
    turns_mean: float = Field(ge=1)
    """Mean turns per conversation. Counts are geometric: after each turn the user goes on with the
    same probability, 1 - 1/turns_mean."""
    max_turns: int = Field(16, ge=1)
    """Turns per conversation at most (the geometric tail is cut here)."""
    user_tokens: LengthDist
    """Each new user message."""
    answer_tokens: LengthDist
    """Each answer (sent with ignore_eos, so the service generates exactly this many)."""
    think_time_s: float = Field(ge=0)
    """Mean pause between an answer's end and the next message (exponential)."""
    system_prompts: int = Field(0, ge=0)
    """Distinct system prompts the conversations share, each conversation one at random; 0: none."""
    system_prompt_tokens: int = Field(0, ge=0)
    """Length of each system prompt."""

    @model_validator(mode="after")
    def _system_prompts_have_a_length(self) -> ConversationWorkload:
        if bool(self.system_prompts) != bool(self.system_prompt_tokens):
            raise ValueError("system_prompts and system_prompt_tokens go together: both 0, or both > 0")
        return self


_LMSYS = ("LMSYS-Chat-1M (Zheng et al., ICLR 2024, Table 1): 2.0 turns per conversation, 69.5 tokens per user "
          "message and 214.5 per answer on average")

BUILT_IN: dict[str, ConversationWorkload] = {
    "multi-turn": ConversationWorkload(
        name="multi-turn", source=f"{_LMSYS}; the geometric turn count, sigmas 1.0 and 0.8 and the 10 s mean think "
                                  "time are ours",
        turns_mean=2.0, user_tokens=LengthDist(mean=69.5, sigma=1.0, min_tokens=4, max_tokens=1024),
        answer_tokens=LengthDist(mean=214.5, sigma=0.8, min_tokens=4, max_tokens=1024), think_time_s=10.0),
    "shared-prefix": ConversationWorkload(
        name="shared-prefix", source=f"questions and answers as in {_LMSYS}, one turn each, behind one of 8 "
                                     "system prompts of 1024 tokens (the prompts' count and length are ours)",
        turns_mean=1.0, max_turns=1, user_tokens=LengthDist(mean=69.5, sigma=1.0, min_tokens=4, max_tokens=1024),
        answer_tokens=LengthDist(mean=214.5, sigma=0.8, min_tokens=4, max_tokens=1024), think_time_s=0.0,
        system_prompts=8, system_prompt_tokens=1024),
}


def load(name_or_path: str) -> AnyWorkload | ConversationWorkload:
    """A built-in workload of either kind by name, or one from a file (`kind: conversation` marks
    conversations); ValueError saying what is wrong otherwise."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML/JSON: {err}") from None
        if isinstance(data, dict) and data.get("kind") == "conversation":
            try:
                return ConversationWorkload.model_validate(data)
            except ValidationError as err:
                raise ValueError(f"{path} is not a valid conversation workload: {err}") from None
    try:
        return load_workload(name_or_path)
    except ValueError as err:
        raise ValueError(f"{err}; conversation workloads built in: {', '.join(BUILT_IN)}") from None


@dataclass(frozen=True)
class Conversation:
    """One conversation's messages as token ids; its answers come from the service."""

    system: tuple[int, ...]
    """Its system prompt (empty: none)."""
    messages: tuple[tuple[int, ...], ...]
    """Each turn's new user message."""
    answer_tokens: tuple[int, ...]
    """Each turn's answer length."""
    think_s: tuple[float, ...]
    """Each turn's pause after the previous answer (the first turn's is 0)."""


def make_conversations(workload: ConversationWorkload, n: int, vocabulary: Sequence[int], seed: int,
                       content_seed: int | Sequence[int]) -> list[Conversation]:
    """n conversations: turn counts, lengths and think times from `seed`, words (system prompts
    included) from `content_seed`, so one shape can be sent with fresh contents."""
    rng, words = np.random.default_rng(seed), np.random.default_rng(content_seed)
    vocab = np.asarray(vocabulary)
    systems = [tuple(vocab[words.integers(len(vocab), size=workload.system_prompt_tokens)].tolist())
               for _ in range(workload.system_prompts)]
    turns = np.minimum(rng.geometric(1.0 / workload.turns_mean, size=n), workload.max_turns)
    out = []
    for count in turns.tolist():
        user = workload.user_tokens.sample(rng, count).tolist()
        answers = workload.answer_tokens.sample(rng, count).tolist()
        think = [0.0, *rng.exponential(workload.think_time_s, size=count - 1).tolist()] if workload.think_time_s \
            else [0.0] * count
        system = systems[int(rng.integers(len(systems)))] if systems else ()
        messages = tuple(tuple(vocab[words.integers(len(vocab), size=u)].tolist()) for u in user)
        out.append(Conversation(system, messages, tuple(answers), tuple(think)))
    return out


def first_turn_lengths(conversations: Sequence[Conversation]) -> list[tuple[int, int]]:
    """(prompt_tokens, output_tokens) of each conversation's first turn: what calibration sends."""
    return [(len(c.system) + len(c.messages[0]), c.answer_tokens[0]) for c in conversations]


async def run_conversations(base_url: str, model: str, conversations: Sequence[Conversation],
                            arrivals_s: Sequence[float], encode: Callable[[str], list[int]], max_model_len: int,
                            timeout_s: float = 600.0, progress: Callable[[int, int], None] | None = None,
                            objectives: tuple[float | None, float | None] = (None, None),
                            ) -> list[tuple[RequestSpec, RequestResult]]:
    """Every conversation from its arrival, turn after turn; (spec, result) of every turn sent, by
    conversation then turn, each turn carrying `objectives` (TTFT and TPOT, ms; None: none). A
    conversation ends early when a turn fails (the user leaves) or when the next turn would not fit
    `max_model_len` (the user starts a new chat, a new conversation)."""
    url = completions_url(base_url)
    total, done = sum(len(c.messages) for c in conversations), 0

    async with http_client(timeout_s) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        def advance(turns: int) -> None:
            nonlocal done
            done += turns
            if turns and progress is not None:
                progress(done, total)

        async def converse(index: int, conv: Conversation, arrival_s: float) -> list[tuple[RequestSpec, RequestResult]]:
            await asyncio.sleep(max(0.0, start + arrival_s - loop.time()))
            history, sent = list(conv.system), []
            for turn, (message, answer_tokens, think_s) in enumerate(
                    zip(conv.messages, conv.answer_tokens, conv.think_s, strict=True)):
                await asyncio.sleep(think_s)
                prompt = history + list(message)
                if len(prompt) + answer_tokens > max_model_len:
                    break
                spec = RequestSpec(loop.time() - start, prompt, answer_tokens, "first_turn" if turn == 0 else "later_turn",
                                   *objectives, ignore_eos=True, session_id=f"conversation-{index}")
                result = await send(client, url, model, spec)
                sent.append((spec, result))
                advance(1)
                if result.outcome != "ok":
                    break
                history = prompt + encode(result.text)
            advance(len(conv.messages) - len(sent))  # turns never sent: done too, as far as progress goes
            return sent

        per_conversation = await asyncio.gather(
            *(converse(i, c, t) for i, (c, t) in enumerate(zip(conversations, arrivals_s, strict=True))))
    return [pair for turns in per_conversation for pair in turns]
