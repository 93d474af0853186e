"""Admission that starves no kind: how long each prompt-length kind has gone refused, and the
controller keeping room for a starved kind on the instance that would serve it soonest."""

import asyncio
import itertools
import time
from dataclasses import replace

import pytest
from pydantic import ValidationError

from pdserve.config.routing import FairAdmission, RoutingConfig
from pdserve.controller.admission import KindWaits
from pdserve.controller.decision import Outcome
from pdserve.controller.server import Controller

from .routing_states import SLOW, add, request

LONG = "257-2048"
IDS = itertools.count()


def test_kinds_are_prompt_length_classes_named_by_their_bounds():
    waits = KindWaits(FairAdmission())
    assert [waits.kind(n) for n in (1, 256, 257, 2048, 2049)] == ["1-256", "1-256", LONG, LONG, ">2048"]
    assert KindWaits(FairAdmission(prompt_class_bounds_tokens=[])).kind(10_000) == "all"


def test_a_kind_is_starved_once_refused_for_max_wait_s_with_none_admitted():
    waits = KindWaits(FairAdmission(max_wait_s=5.0))
    waits.refused(request(1000), now_s=100.0)
    waits.refused(request(1200), now_s=103.0)
    assert waits.starved(104.9) is None
    starved = waits.starved(105.0)
    assert (starved.kind, starved.waited_s, starved.request.prompt_tokens) == (LONG, 5.0, 1200)  # the latest refused
    waits.admitted(request(300))
    assert waits.starved(106.0) is None  # admitted: its wait starts over at its next refusal


def test_a_kind_no_longer_arriving_is_not_waited_for_and_the_longest_waiting_kind_comes_first():
    waits = KindWaits(FairAdmission(max_wait_s=5.0))
    waits.refused(request(1000), now_s=100.0)
    waits.refused(request(1000), now_s=104.0)
    assert waits.starved(105.5) is not None
    assert waits.starved(109.1) is None  # last refused 5.1 s ago
    waits.refused(request(1000), now_s=110.0)
    assert waits.starved(114.0) is None  # arriving again: waiting since 110 s
    for t in (110.0, 113.0, 116.0):
        waits.refused(request(5000), now_s=t)
        waits.refused(request(20), now_s=t + 1)
    assert waits.starved(116.0).kind == ">2048"


@pytest.mark.parametrize("bounds", [[2048, 256], [256, 256], [0, 256]])
def test_class_bounds_must_be_positive_and_ascending(bounds):
    with pytest.raises(ValidationError, match="strictly ascending"):
        FairAdmission(prompt_class_bounds_tokens=bounds)


def test_off_at_zero():
    waits = KindWaits(FairAdmission(max_wait_s=0))
    waits.refused(request(1000), now_s=0.0)
    assert waits.starved(1000.0) is None


def controller(mode: str = "colocated", max_wait_s: float = 5.0, queued: tuple[int, int] = (600, 700)) -> Controller:
    """Two instances with prompts queued (SLOW: 60 ms + 1.5 ms per token): a 1000-token prompt
    with a 2000 ms TTFT objective fits on neither (2460 ms, 2610 ms), a 50-token one with 1600 ms
    on both."""
    c = Controller(mode, RoutingConfig(profiles={"default": SLOW}, probe_after_s=0,
                                       fair_admission=FairAdmission(max_wait_s=max_wait_s)), kv_bytes_per_token=1000)
    now = time.monotonic()
    pool = "prefill" if mode == "disaggregated" else "colocated"
    add(c.registry, "i1", pool, queued_prefill_tokens=queued[0], now_s=now)
    add(c.registry, "i2", pool, queued_prefill_tokens=queued[1], now_s=now)
    if mode == "disaggregated":
        add(c.registry, "d", "decode", now_s=now)
    return c


def choose(c: Controller, prompt_tokens: int, ttft_ms: float):
    req = replace(request(prompt_tokens, ttft_ms=ttft_ms), request_id=f"r{next(IDS)}")
    return asyncio.run(c.choose(req))


def starve_long_prompts(c: Controller) -> None:
    """Long prompts refused since 6 s ago, the latest now."""
    c.waits.refused(request(1000, ttft_ms=2000), time.monotonic() - 6.0)
    c.waits.refused(request(1000, ttft_ms=2000), time.monotonic() - 3.0)
    assert choose(c, 1000, 2000).outcome is Outcome.REJECTED


def test_short_prompts_leave_the_instance_a_starved_kind_needs_until_it_has_drained_enough():
    c = controller()
    starve_long_prompts(c)
    placed = [choose(c, 50, 1600) for _ in range(30)]
    routed = [d for d in placed if d.outcome is Outcome.ROUTED]
    assert routed and all(d.decode.replica_id == "i2" for d in routed)  # i1 alone would be chosen: its queue is shorter
    assert routed[0].reason.startswith(f"room kept on i1 for {LONG}-token prompts, refused for 6.0 s "
                                       "(1500 ms of prompt within 2000 ms); local prefill")
    refused = placed[len(routed)]
    assert refused.outcome is Outcome.REJECTED and refused.reason.startswith("room kept on i1")
    add(c.registry, "i1", "colocated", queued_prefill_tokens=0, now_s=time.monotonic())  # i1 drains
    long = choose(c, 1000, 2000)
    assert long.outcome is Outcome.ROUTED and long.decode.replica_id == "i1"
    add(c.registry, "i2", "colocated", queued_prefill_tokens=0, now_s=time.monotonic())
    short = choose(c, 50, 1600)  # the long prompt was admitted: its wait is over, i2 is soonest
    assert short.decode.replica_id == "i2" and "room kept" not in short.reason


def test_without_fair_admission_short_prompts_take_the_instance_and_long_ones_stay_refused():
    c = controller(max_wait_s=0)
    starve_long_prompts(c)
    assert choose(c, 50, 1600).decode.replica_id == "i1"


def test_a_short_prompt_that_leaves_room_enough_goes_where_it_is_soonest():
    c = controller()
    starve_long_prompts(c)
    add(c.registry, "i1", "colocated", queued_prefill_tokens=200, now_s=time.monotonic())  # long fits on i1 again
    d = choose(c, 50, 1600)  # 60 + 1.5 x 250 + a step on i1, then the long prompt's 1500 ms: within 2000 ms
    assert d.decode.replica_id == "i1" and "room kept" not in d.reason


def test_no_room_is_kept_for_a_kind_not_even_an_idle_instance_would_serve_in_time():
    c = controller()
    c.waits.refused(request(1000, ttft_ms=1000), time.monotonic() - 6.0)  # 1560 ms of prefill alone
    c.waits.refused(request(1000, ttft_ms=1000), time.monotonic() - 3.0)
    assert choose(c, 1000, 1000).outcome is Outcome.REJECTED
    d = choose(c, 50, 1600)
    assert d.decode.replica_id == "i1" and "room kept" not in d.reason


def test_disaggregated_room_is_kept_on_a_prefill_instance_and_the_decode_instance_still_serves():
    c = controller("disaggregated")
    starve_long_prompts(c)
    d = choose(c, 200, 1600)  # longer than a decode instance prefills itself
    assert (d.outcome, d.prefill.replica_id, d.decode.replica_id) == (Outcome.ROUTED, "i2", "d")
    assert d.reason.startswith("room kept on i1")


def test_a_resumed_request_is_served_where_it_is_soonest_whatever_room_is_kept():
    c = controller()
    starve_long_prompts(c)
    d = asyncio.run(c.choose(request(50, ttft_ms=1600), resuming=True))
    assert d.decode.replica_id == "i1"
