"""How the ingress waits on the controller's answer for one request: refusals end it at once
(unless its answer is already streaming), a held request asks again when told, and a pool with
no live instance or a controller that does not answer is waited out for a while."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from ray.exceptions import RayActorError

from pdserve.controller.decision import Decision, Outcome, RouteRequest
from pdserve.deployments.failover import refusal

ROUTE_POLL_S = 0.25
"""How often a request waiting for a live instance asks the controller again."""


async def route_waiting(choose: Callable[[RouteRequest, bool], Awaitable[Decision]], route: RouteRequest,
                        resuming: bool, route_wait_s: float) -> tuple[Decision, float]:
    """The controller's pair for `route` and how long it was held (s). Overload and unmeetable
    objectives are refused at once, unless the request is already streaming to its client
    (`resuming`, routed best effort), which waits for room; a request the controller holds asks
    again when it says (the controller bounds the hold by the request's TTFT objective), telling
    how long it has been held and what is left of its lifetime; no live instance, or no answer
    from the controller (restarting), is waited out for up to `route_wait_s` since its last answer."""
    asked_s, lifetime_s = time.monotonic(), route.lifetime_s
    give_up_s = asked_s + route_wait_s
    while True:
        try:
            decision = await asyncio.wait_for(choose(route, resuming), max(give_up_s - time.monotonic(), ROUTE_POLL_S))
        except (TimeoutError, RayActorError) as exc:
            decision = Decision(Outcome.UNAVAILABLE, reason=f"the controller did not answer ({type(exc).__name__})")
        if decision.outcome is Outcome.ROUTED:
            return decision, route.held_ms / 1e3
        if decision.outcome is Outcome.HELD:
            await asyncio.sleep(decision.retry_after_s)
            held_s = time.monotonic() - asked_s
            route = replace(route, held_ms=held_s * 1000.0, lifetime_s=max(lifetime_s - held_s, 0.0))
            give_up_s = time.monotonic() + route_wait_s
            continue
        busy = decision.outcome in (Outcome.REJECTED, Outcome.OVERLOADED)
        wait_s = decision.retry_after_s if busy else ROUTE_POLL_S
        if (busy and not resuming) or time.monotonic() + wait_s > give_up_s:
            raise refusal(decision)
        await asyncio.sleep(wait_s)
