"""What expert buffering did, per layer: the figures the engine reports to the controller."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerCounters:
    """One MoE layer since install."""

    hits: int = 0
    """Distinct experts a step needed that were resident when it began."""
    misses: int = 0
    """Expert loads a step made (an expert reloaded for a later round of the step counts again)."""
    bytes_moved: int = 0
    """Host-to-device bytes for demand loads and prefetches."""
    prefetched: int = 0
    stall_s: float = 0.0
    """Time the layer waited for copies before its experts could run."""
    tokens: int = 0


def summarize(layers: list[LayerCounters], activations: list[list[int]], slot_bytes: int) -> dict:
    """The engine-wide figures: per token means per forward token (each token passes every
    layer once, so the first layer's token count is the engine's). `activations[layer][expert]`
    are the tokens routed to each expert, for the controller's hot set."""
    hits = sum(c.hits for c in layers)
    misses = sum(c.misses for c in layers)
    tokens = layers[0].tokens if layers else 0
    moved = sum(c.bytes_moved for c in layers)
    stall_s = sum(c.stall_s for c in layers)
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
        "tokens": tokens,
        "bytes_moved": moved,
        "bytes_moved_per_token": moved / tokens if tokens else 0.0,
        "stall_s": stall_s,
        "stall_s_per_token": stall_s / tokens if tokens else 0.0,
        "prefetched": sum(c.prefetched for c in layers),
        "device_bytes_held": slot_bytes,
        "activations": activations,
    }
