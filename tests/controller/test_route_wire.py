"""The routing channel's wire format carries every field of a route request and a decision, and
refuses what is not one: wrong types, missing fields, frames that are not JSON objects or are
larger than any route request (refused from the length alone, the body never read)."""

from __future__ import annotations

import asyncio
import math

import pytest

from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest, Target
from pdserve.controller.route_wire import (
    MAX_FRAME_BYTES,
    WireError,
    decision_from_wire,
    decision_to_wire,
    frame,
    read_frame,
    request_from_wire,
    request_to_wire,
)

REQ = RouteRequest("r-1", 812, 64, SLO(ttft_ms=750.0, tpot_ms=42.5, priority=3), lifetime_s=17.5,
                   ingress_id="ing-2", prefix_hashes=(2**63 - 1, -5, 0), session_id="chat-9",
                   held_ms=1250.5)
DECISION = Decision(Outcome.ROUTED, Target("p-1", "", 2, "prefill", 4), Target("d-1", "10.0.0.2:5601", 5, "decode", 2),
                    "prefill p-1 -> d-1", 412.5, 38.25, 1.0, cached_tokens=128, decode_cached_tokens=64)


def _frames(*chunks: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    return reader


async def test_a_route_request_and_a_decision_cross_the_wire_whole():
    reader = _frames(frame({"req": request_to_wire(REQ)}), frame({"decision": decision_to_wire(DECISION)}))
    assert request_from_wire((await read_frame(reader))["req"]) == REQ
    assert decision_from_wire((await read_frame(reader))["decision"]) == DECISION
    refusal = Decision(Outcome.REJECTED, reason="no pair", predicted_ttft_ms=math.inf, retry_after_s=2.5)
    assert decision_from_wire(decision_to_wire(refusal)) == refusal
    held = Decision(Outcome.HELD, reason="held", predicted_ttft_ms=9000.0, retry_after_s=0.2)
    assert decision_from_wire(decision_to_wire(held)) == held


@pytest.mark.parametrize("broken", [
    lambda d: d.pop("prefix_hashes"),
    lambda d: d.__setitem__("prompt_tokens", "812"),
    lambda d: d.__setitem__("prompt_tokens", True),  # a bool is not a count
    lambda d: d.__setitem__("slo", [750.0, "fast", 0]),
    lambda d: d.__setitem__("slo", [750.0]),
    lambda d: d.__setitem__("prefix_hashes", [1, 2.5]),
    lambda d: d.__setitem__("held_ms", "long"),
], ids=["missing", "string_count", "bool_count", "string_objective", "short_slo", "float_hash", "string_held"])
def test_a_route_request_with_a_wrong_or_missing_field_is_refused(broken):
    d = request_to_wire(REQ)
    broken(d)
    with pytest.raises(WireError, match="not a route request"):
        request_from_wire(d)


@pytest.mark.parametrize("broken", [
    lambda d: d.__setitem__("outcome", "maybe"),
    lambda d: d.__setitem__("decode", ["d-1", "a:1", 0, "decode"]),
    lambda d: d.pop("reason"),
], ids=["unknown_outcome", "short_target", "missing"])
def test_a_decision_with_a_wrong_or_missing_field_is_refused(broken):
    d = decision_to_wire(DECISION)
    broken(d)
    with pytest.raises(WireError, match="not a decision"):
        decision_from_wire(d)


async def test_frames_that_are_not_json_objects_are_refused():
    for body in (b"[1, 2]", b"{not json", b"\xff\xfe"):
        with pytest.raises(WireError):
            await read_frame(_frames(len(body).to_bytes(4, "big") + body))


async def test_an_oversized_frame_is_refused_from_its_length_before_its_body_is_read():
    reader = _frames((2**31).to_bytes(4, "big"), b"{}")
    with pytest.raises(WireError, match="over"):
        await read_frame(reader)
    assert await reader.read() == b"{}"  # untouched
    with pytest.raises(WireError, match="over"):
        frame({"prefix_hashes": [1] * MAX_FRAME_BYTES})
