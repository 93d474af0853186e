"""What the router is asked (`RouteRequest`) and what it answers (`Decision`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    ROUTED = "routed"
    REJECTED = "rejected"  # no pair is predicted to meet the request's objectives: retry later (429)
    OVERLOADED = "overloaded"  # every instance of a pool is full or out of KV room: retry later (429)
    UNAVAILABLE = "unavailable"  # a pool has no live instance (503)
    HELD = "held"  # best effort: served now it would miss its objectives, its TTFT leaves time to wait: ask again


@dataclass(frozen=True)
class SLO:
    """A request's latency objectives, every one set (the client's, else the service's defaults)."""

    ttft_ms: float
    tpot_ms: float
    priority: int = 0
    """0 is the most important; higher values are refused earlier under load."""


@dataclass(frozen=True)
class RouteRequest:
    """One request as the router sees it: its size and its objectives."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    slo: SLO
    lifetime_s: float = 600.0
    """How long the request may still run (what is left of its deadline at the ingress): its
    bookings on instances expire then, whether or not a release ever comes."""
    ingress_id: str = ""
    """The Serve replica id of the ingress routing it: its bookings go once that replica is gone
    ("": only at the deadline)."""
    prefix_hashes: tuple[int, ...] = ()
    """The prompt's chained hashes, piece by piece (`prefix_index.block_hashes`): what the router
    looks up in the instances' prefix caches."""
    session_id: str = ""
    """The conversation it is a turn of ("": none): its previous turn's instances hold its prefix
    before their cache events say so (`sessions.py`)."""
    held_ms: float = 0.0
    """How long its ingress has held it already (`Outcome.HELD`): spent out of its TTFT objective."""


@dataclass(frozen=True)
class Target:
    replica_id: str
    kv_addr: str
    load: int
    pool: str
    """Its pool: the Serve deployment the ingress calls it through."""
    tp_size: int = 1
    """Tensor-parallel ranks of its engine: a KV transfer to or from it moves a part per rank."""


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    prefill: Target | None = None
    """None when the decode target prefills the prompt itself (colocated mode, or a short
    prompt routed to local prefill)."""
    decode: Target | None = None
    reason: str = ""
    predicted_ttft_ms: float = 0.0
    predicted_tpot_ms: float = 0.0
    retry_after_s: float = 1.0
    """For a refusal: when a retry has a fair chance; for a held request: when to ask again."""
    cached_tokens: int = 0
    """Prompt tokens the instance that prefills it is predicted to hold in its prefix cache."""
    decode_cached_tokens: int = 0
    """With a prefill instance: prompt tokens the decode instance is predicted to hold, which the
    KV transfer leaves out (a conversation's earlier turns, decoded there)."""

    def targets(self) -> list[Target]:
        return [t for t in (self.prefill, self.decode) if t is not None]
