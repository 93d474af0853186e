"""The autoscaling loop inside the controller: observe, decide, actuate, every interval.

Observing reads what the controller already has (the requests it routed, the instances'
load reports); deciding is `desired_replicas`; actuating goes through `Actuator`s, the
first of which also says how many replicas each pool has now.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import asdict

from pdserve.config.autoscaling_policy import AutoscalingPolicy
from pdserve.controller.autoscaling.actuator import Actuator
from pdserve.controller.autoscaling.decision import Memory, PoolSignals, PoolSizes, Signals, desired_replicas
from pdserve.controller.registry import Registry

log = logging.getLogger("pdserve.autoscale")


class RateWindow:
    """Requests routed and tokens produced over the last `window_s` seconds."""

    def __init__(self, window_s: float, started_s: float):
        self.window_s = window_s
        self.started_s = started_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._outputs: deque[tuple[float, int]] = deque()

    def arrived(self, now_s: float, prompt_tokens: int) -> None:
        self._arrivals.append((now_s, prompt_tokens))
        self._prune(now_s)

    def finished(self, now_s: float, output_tokens: int) -> None:
        self._outputs.append((now_s, output_tokens))
        self._prune(now_s)

    def rates(self, now_s: float) -> tuple[float, float, float]:
        """(requests/s, prompt tokens/s, output tokens/s); a controller younger than the window
        divides by its age, so a restart does not read as a lull."""
        self._prune(now_s)
        span = max(1e-3, min(self.window_s, now_s - self.started_s))
        return (len(self._arrivals) / span, sum(t for _, t in self._arrivals) / span,
                sum(t for _, t in self._outputs) / span)

    def _prune(self, now_s: float) -> None:
        horizon = now_s - self.window_s
        for q in (self._arrivals, self._outputs):
            while q and q[0][0] < horizon:
                q.popleft()


def pool_signals(registry: Registry, pool: str, replicas: int, now_s: float) -> PoolSignals:
    live = registry.live(pool, now_s)
    total = sum(i.report.total_kv_blocks for i in live)
    free = sum(i.report.free_kv_blocks for i in live)
    recent = [i.report.recent_ttft_ms if pool == "prefill" else i.report.recent_tpot_ms for i in live]
    recent = [ms for ms in recent if ms > 0]
    return PoolSignals(
        replicas=replicas,
        ready_replicas=len(live),
        queued_prefill_tokens=float(sum(i.queued_prefill_tokens() for i in live)),
        running_seqs=float(sum(max(i.report.running, i.load) for i in live)),
        kv_usage=(total - free) / total if total else 0.0,
        measured_ms=sum(recent) / len(recent) if recent else None,
    )


def describe(sizes: PoolSizes) -> dict:
    """The decision as plain data, for metrics and the controller's status call."""
    return {"prefill": asdict(sizes.prefill), "decode": asdict(sizes.decode), "gpus": sizes.gpus,
            "cost_per_hour": sizes.cost_per_hour}


class Autoscaler:
    def __init__(self, policy: AutoscalingPolicy, actuators: list[Actuator]):
        self.policy = policy
        self.actuators = actuators
        self.memory = Memory()
        self.last: PoolSizes | None = None

    async def step(self, registry: Registry, window: RateWindow, now_s: float) -> PoolSizes:
        """One decision; the actuators run in threads because they talk to a cluster."""
        current = await asyncio.to_thread(self.actuators[0].current)
        arrival_rps, prompt_tps, output_tps = window.rates(now_s)
        signals = Signals(now_s, arrival_rps, prompt_tps, output_tps,
                          pool_signals(registry, "prefill", current["prefill"], now_s),
                          pool_signals(registry, "decode", current["decode"], now_s))
        sizes = desired_replicas(signals, self.policy, self.memory)
        self.memory, self.last = sizes.memory, sizes
        wanted = sizes.replicas()
        changed = wanted != current
        log.log(logging.INFO if changed else logging.DEBUG,
                "autoscale (%.2f req/s, %.0f prompt tok/s, %.0f output tok/s): prefill %d -> %d, decode %d -> %d, "
                "%.1f GPUs, %.2f/h; %s", arrival_rps, prompt_tps, output_tps, current["prefill"], wanted["prefill"],
                current["decode"], wanted["decode"], sizes.gpus, sizes.cost_per_hour, "; ".join(sizes.reasons()))
        if changed:
            for actuator in self.actuators:
                await asyncio.to_thread(actuator.apply, wanted)
        return sizes

    async def run(self, registry: Registry, window: RateWindow, clock) -> None:
        """Decide every `interval_s` until cancelled; a failed step is logged and retried next time."""
        while True:
            await asyncio.sleep(self.policy.interval_s)
            try:
                await self.step(registry, window, clock())
            except Exception as exc:
                log.warning("autoscale step failed: %s", exc)
