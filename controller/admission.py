"""Admission that starves no kind of request: aging by prompt-length class.

SLO-aware admission refuses what is predicted to miss its objectives. Under overload that can be
every long prompt: short ones keep the prefill queues just short enough for themselves, so a long
prompt never finds the room it needs, and goodput is bought by refusing a whole kind.

A kind is starved once it has been refused for `max_wait_s` with none of it admitted, and was
refused within the last `max_wait_s` (a kind no longer arriving is not waited for). While one is,
the controller keeps room for it on one instance: the one that would prefill its latest refused
request soonest takes other kinds' prompts only where that request would still meet its TTFT
objective after them. Other kinds go to other instances or are refused; that instance drains, the
kind's next request fits and is admitted, and its wait starts over. So a kind that an idle
instance can serve within its objectives is admitted about once per `max_wait_s` plus a drain at
the least, whatever else arrives.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from pdserve.config.routing import FairAdmission
from pdserve.controller.decision import Decision, RouteRequest


@dataclass
class _Waiting:
    since_s: float
    """Its first refusal since its last admission."""
    last_s: float
    """Its latest refusal."""
    request: RouteRequest
    """Its latest refused request: what room is kept for."""


@dataclass(frozen=True)
class Starved:
    kind: str
    waited_s: float
    request: RouteRequest


@dataclass(frozen=True)
class Room:
    """Room kept on one instance for a starved kind's request."""

    kind: str
    waited_s: float
    replica_id: str
    prompt_ms: float
    """That request's own prefill compute there (its uncached tokens, the fixed cost aside)."""
    ttft_limit_ms: float
    """Its TTFT objective, less its priority's margin."""

    def left_by(self, decision: Decision) -> bool:
        """Whether a routed request of another kind leaves the room: it prefills elsewhere, or
        its first token there is soon enough that the starved request's prefill still fits
        after it (the queue it adds is what its own TTFT predicts)."""
        prefilling = decision.prefill or decision.decode
        return (prefilling is None or prefilling.replica_id != self.replica_id
                or decision.predicted_ttft_ms + self.prompt_ms <= self.ttft_limit_ms)

    def describe(self) -> str:
        return (f"room kept on {self.replica_id} for {self.kind}-token prompts, refused for {self.waited_s:.1f} s "
                f"({self.prompt_ms:.0f} ms of prompt within {self.ttft_limit_ms:.0f} ms)")


class KindWaits:
    """How long each kind has gone refused with none admitted."""

    def __init__(self, cfg: FairAdmission):
        self.cfg = cfg
        self._waiting: dict[str, _Waiting] = {}

    def kind(self, prompt_tokens: int) -> str:
        """"1-256", "257-2048", ">2048" with the default bounds."""
        bounds = self.cfg.prompt_class_bounds_tokens
        i = bisect_left(bounds, prompt_tokens)
        if i == len(bounds):
            return f">{bounds[-1]}" if bounds else "all"
        return f"{bounds[i - 1] + 1 if i else 1}-{bounds[i]}"

    def admitted(self, req: RouteRequest) -> None:
        self._waiting.pop(self.kind(req.prompt_tokens), None)

    def refused(self, req: RouteRequest, now_s: float) -> None:
        kind = self.kind(req.prompt_tokens)
        waiting = self._waiting.get(kind)
        if waiting is None or now_s - waiting.last_s > self.cfg.max_wait_s:  # new, or arriving again
            self._waiting[kind] = _Waiting(now_s, now_s, req)
        else:
            waiting.last_s, waiting.request = now_s, req

    def starved(self, now_s: float) -> Starved | None:
        """The kind refused longest beyond `max_wait_s` that is still arriving (None: none, or off)."""
        limit = self.cfg.max_wait_s
        if limit <= 0:
            return None
        due = [(w.since_s, k) for k, w in self._waiting.items() if now_s - w.since_s >= limit >= now_s - w.last_s]
        if not due:
            return None
        since_s, kind = min(due)
        return Starved(kind, now_s - since_s, self._waiting[kind].request)
