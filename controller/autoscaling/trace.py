"""The request trace `pdserve autoscale --replay` reads and `pdserve bench trace` writes.

JSONL, one request per line, sorted by arrival:
`{"arrival_s": 12.5, "prompt_tokens": 812, "output_tokens": 64}` (other keys are ignored, so
recorded traces may carry more). Arrival and lengths are all the replay needs: it sizes pools
from token rates, not from the text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    """Offset from the start of the trace."""
    prompt_tokens: int
    output_tokens: int


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file and line."""


def _count(row: dict, key: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def _arrival(row: dict) -> float:
    value = row.get("arrival_s")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"arrival_s must be a number >= 0, got {value!r}")
    return float(value)


def parse_trace(lines: Iterable[str], source: str = "trace") -> list[TraceRequest]:
    """Requests from JSONL lines (blank lines skipped); TraceError naming `source:line` otherwise."""
    requests: list[TraceRequest] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            request = TraceRequest(_arrival(row), _count(row, "prompt_tokens"), _count(row, "output_tokens"))
        except ValueError as err:  # json.JSONDecodeError is one
            raise TraceError(f"{source}:{n}: {err}") from None
        if requests and request.arrival_s < requests[-1].arrival_s:
            raise TraceError(f"{source}:{n}: arrival_s {request.arrival_s:g} is before the previous request's "
                             f"{requests[-1].arrival_s:g}; sort the trace by arrival_s")
        requests.append(request)
    if not requests:
        raise TraceError(f"{source} holds no requests")
    return requests


def load_trace(path: str | Path) -> list[TraceRequest]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise TraceError(f"cannot read trace {p}: {err.strerror}") from None
    return parse_trace(text.splitlines(), str(p))


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    """Write `requests` as JSONL; returns how many."""
    n = 0
    with Path(path).open("w") as f:
        for r in requests:
            f.write(json.dumps(asdict(r)) + "\n")
            n += 1
    return n
