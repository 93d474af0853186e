"""The routing channel's wire format (`route_server.py`): frames of a 4-byte big-endian length and
a JSON object, and the routing types as JSON. Plain data only: nothing a peer sends is unpickled
or evaluated, and anything that does not parse as these types is a `WireError`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest, Target

MAX_FRAME_BYTES = 1 << 20
"""Largest frame either side reads: a route request's prefix hashes for a 128k-token prompt are
about 160 KB of JSON."""


class WireError(ValueError):
    """A frame or a value that is not what the routing channel carries."""


def frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"a frame of {len(body)} B is over {MAX_FRAME_BYTES} B")
    return len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """The next frame's object. IncompleteReadError at the end of the stream; WireError for a
    frame over `max_bytes` (its body is not read) or a malformed one."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > max_bytes:
        raise WireError(f"a frame of {size} B is over {max_bytes} B")
    try:
        obj = json.loads(await reader.readexactly(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"a frame that is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError(f"a frame that is not a JSON object but {type(obj).__name__}")
    return obj


def request_to_wire(req: RouteRequest) -> dict[str, Any]:
    return {"request_id": req.request_id, "prompt_tokens": req.prompt_tokens, "max_tokens": req.max_tokens,
            "slo": [req.slo.ttft_ms, req.slo.tpot_ms, req.slo.priority], "lifetime_s": req.lifetime_s,
            "ingress_id": req.ingress_id, "prefix_hashes": list(req.prefix_hashes), "session_id": req.session_id,
            "held_ms": req.held_ms}


def request_from_wire(d: Any) -> RouteRequest:
    try:
        ttft_ms, tpot_ms, priority = d["slo"]
        return RouteRequest(_typed(d["request_id"], str), _typed(d["prompt_tokens"], int), _typed(d["max_tokens"], int),
                            SLO(_number(ttft_ms), _number(tpot_ms), _typed(priority, int)),
                            lifetime_s=_number(d["lifetime_s"]), ingress_id=_typed(d["ingress_id"], str),
                            prefix_hashes=tuple(_typed(h, int) for h in _typed(d["prefix_hashes"], list)),
                            session_id=_typed(d["session_id"], str), held_ms=_number(d["held_ms"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"not a route request: {exc!r}") from None


def decision_to_wire(d: Decision) -> dict[str, Any]:
    return {"outcome": d.outcome.value, "prefill": _target_to_wire(d.prefill), "decode": _target_to_wire(d.decode),
            "reason": d.reason, "predicted_ttft_ms": d.predicted_ttft_ms, "predicted_tpot_ms": d.predicted_tpot_ms,
            "retry_after_s": d.retry_after_s, "cached_tokens": d.cached_tokens,
            "decode_cached_tokens": d.decode_cached_tokens}


def decision_from_wire(d: Any) -> Decision:
    try:
        return Decision(Outcome(d["outcome"]), _target_from_wire(d["prefill"]), _target_from_wire(d["decode"]),
                        _typed(d["reason"], str), _number(d["predicted_ttft_ms"]), _number(d["predicted_tpot_ms"]),
                        _number(d["retry_after_s"]), _typed(d["cached_tokens"], int),
                        _typed(d["decode_cached_tokens"], int))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"not a decision: {exc!r}") from None


def _target_to_wire(t: Target | None) -> list | None:
    return None if t is None else [t.replica_id, t.kv_addr, t.load, t.pool, t.tp_size]


def _target_from_wire(t: Any) -> Target | None:
    if t is None:
        return None
    replica_id, kv_addr, load, pool, tp_size = t
    return Target(_typed(replica_id, str), _typed(kv_addr, str), _typed(load, int), _typed(pool, str),
                  _typed(tp_size, int))


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{value!r} is not {kind.__name__}")
    return value


def _number(value: Any) -> float:
    """A JSON number (inf and nan travel as Python's json writes them)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)
