"""Which engine instance holds which prompt prefix in its prefix cache: the cluster's view, kept
from the KV cache events each engine publishes (vLLM's `BlockStored` / `BlockRemoved` /
`AllBlocksCleared`), so that routing can charge a prompt only for what an instance would compute.

Cached prefixes are keyed, 16 tokens at a time, by pdserve's own hash chain over their tokens
(`block_hashes`), computed the same way by the ingress for a prompt and here for the tokens an
event carries, as vLLM chains its own. vLLM's hashes depend on the engine's `prefix_caching_hash_algo` (xxhash is
seeded per process unless PYTHONHASHSEED is set), so they need not agree across instances, while
the tokens always do. vLLM's hash of each block is kept only to follow later events (a removal
names it, a stored block names its parent by it).

The view is a guess, never a promise: an event lost or not yet reported makes a prediction
wrong by a recompute, not an answer wrong (the engine's own cache decides what it reuses).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

GRAIN_TOKENS = 16
"""Tokens per hashed piece of a prompt. The ingress hashes prompts without knowing the engines'
KV block size, which vLLM picks per platform (16 on GPUs, 128 on CPUs) and an operator may set:
any block size that is a multiple of this one maps onto whole pieces."""
ROOT = 0x5EED
"""The chain's start: the parent of a prompt's first piece."""
_UNSEEN = object()


def block_hashes(token_ids: Sequence[int], parent: int = ROOT) -> list[int]:
    """The chained hash of each full `GRAIN_TOKENS` piece of `token_ids` after `parent`: piece
    k's covers every token up to its end, so equal hashes mean equal prefixes. Python's hash of a
    tuple of ints is the same in every process (only str and bytes hashing is salted)."""
    out = []
    for start in range(0, len(token_ids) - GRAIN_TOKENS + 1, GRAIN_TOKENS):
        parent = hash((parent, *token_ids[start:start + GRAIN_TOKENS]))
        out.append(parent)
    return out


@dataclass(frozen=True)
class Stored:
    """vLLM's `BlockStored`: blocks cached, consecutive, after the block named `parent`."""

    parent: Hashable | None
    vllm_hashes: tuple[Hashable, ...]
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class Removed:
    """vLLM's `BlockRemoved`: blocks evicted."""

    vllm_hashes: tuple[Hashable, ...]


@dataclass(frozen=True)
class Cleared:
    """vLLM's `AllBlocksCleared`: the whole cache reset."""


CacheEvent = Stored | Removed | Cleared


@dataclass(frozen=True)
class CacheEvents:
    """What an engine's prefix cache did since its previous report, in order."""

    events: tuple[CacheEvent, ...] = ()
    lost: bool = False
    """Events were lost before these (the replica's feed overflowed, or a report failed to
    arrive): what the index knew of the engine is to be forgotten first."""


@dataclass
class _Instance:
    """One instance's cached blocks: vLLM's hash -> the hashes of the block's pieces, oldest
    stored first."""

    blocks: OrderedDict[Hashable, tuple[int, ...]] = field(default_factory=OrderedDict)
    pieces: int = 0


class PrefixIndex:
    """Piece hash -> the instances holding that piece, and per instance what it holds. Each
    instance holds at most `max_pieces_per_instance` (its oldest blocks go first), which bounds
    the index's memory whatever events are lost."""

    def __init__(self, max_pieces_per_instance: int = 1 << 17):
        self.max_pieces_per_instance = max_pieces_per_instance
        self._instances: dict[int, _Instance] = {}
        self._holders: dict[int, int] = {}
        """Piece hash -> its holders: `~i` (negative) when instance i alone holds it, as most pieces
        are, else a bitmap with bit i set for each holder i. A piece 220 of 1,000 instances share
        takes a 134-byte bitmap where a set took 8 KiB, and a lookup's set algebra is a few integer
        operations (instance numbers are reused, so bitmaps stay as wide as the cluster)."""

    def apply(self, instance: int, report: CacheEvents) -> None:
        """An engine's report of its cache, in order."""
        if report.lost:
            self.forget(instance)
        for event in report.events:
            if isinstance(event, Stored):
                self.stored(instance, event.parent, event.vllm_hashes, event.token_ids, event.block_size)
            elif isinstance(event, Removed):
                self.removed(instance, event.vllm_hashes)
            else:
                self.forget(instance)

    def stored(self, instance: int, parent: Hashable | None, vllm_hashes: Sequence[Hashable],
               token_ids: Sequence[int], block_size: int) -> None:
        """Blocks that `instance` cached: consecutive, after the block vLLM names `parent` (None:
        they start a prompt). A parent the index does not know (its event lost) leaves them out,
        and so does a block size that is not a multiple of `GRAIN_TOKENS`."""
        if block_size % GRAIN_TOKENS:
            log.warning("instance %s: KV block size %d is not a multiple of %d tokens; its cache is not indexed",
                        instance, block_size, GRAIN_TOKENS)
            return
        held = self._instances.setdefault(instance, _Instance())
        if parent is None:
            start = ROOT
        elif (parent_pieces := held.blocks.get(parent)) is None:
            return
        else:
            start = parent_pieces[-1]
        per_block = block_size // GRAIN_TOKENS
        pieces = block_hashes(token_ids, start)
        for k, vllm_hash in enumerate(vllm_hashes):
            own = tuple(pieces[k * per_block:(k + 1) * per_block])
            if len(own) < per_block:  # fewer tokens than blocks: the event is malformed
                break
            self._drop(instance, held, vllm_hash)
            held.blocks[vllm_hash] = own
            held.pieces += len(own)
            for h in own:
                self._hold(instance, h)
        while held.pieces > self.max_pieces_per_instance:
            self._drop(instance, held, next(iter(held.blocks)))

    def removed(self, instance: int, vllm_hashes: Iterable[Hashable]) -> None:
        """Blocks `instance` evicted."""
        held = self._instances.get(instance)
        if held is not None:
            for vllm_hash in vllm_hashes:
                self._drop(instance, held, vllm_hash)

    def forget(self, instance: int) -> None:
        """Everything `instance` held: its cache was cleared, it lost events, or it is gone."""
        held = self._instances.pop(instance, None)
        for own in held.blocks.values() if held else ():
            for h in own:
                self._unhold(instance, h)

    def cached_tokens(self, prompt_hashes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The instances holding the prompt's first piece, and how many of its leading tokens each
        holds (two arrays, for the router's vectorized pass).

        What an instance holds of a prompt is a prefix: vLLM evicts a request's blocks last first,
        and a block shared by more requests (a parent) is freed after them. So the holders of piece
        k hold every piece before it, their number only falls along the prompt, and bisecting on
        that number finds where each instance's prefix ends: the work grows with the points where
        it falls, not with the prompt's length or the number of holders. A hole (an eviction
        reported out of that order, or lost) makes the guess too long: a recompute, nothing worse."""
        n = len(prompt_hashes)
        holders: list = [_UNSEEN] * n + [None]  # looked up where the bisection goes: each lookup in
        # a dict of millions of pieces is a cache miss, and most of a prompt's pieces need none

        def at(k: int) -> int | None:
            if holders[k] is _UNSEEN:
                holders[k] = self._holders.get(prompt_hashes[k])
            return holders[k]

        first = _bits(at(0)) if n else 0
        instances, tokens = [], []
        spans = [(0, n)] if first else []
        while spans:
            lo, hi = spans.pop()
            if _count(at(lo)) == _count(at(hi)):
                continue
            if hi - lo > 1:
                mid = (lo + hi) // 2
                spans += [(lo, mid), (mid, hi)]
                continue
            ending = _members(_bits(at(lo)) & ~_bits(at(hi)) & first)
            held = np.empty(len(ending), np.int64)
            held.fill(hi * GRAIN_TOKENS)
            instances.append(ending)
            tokens.append(held)
        if not instances:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(instances) == 1:  # most prompts: every holder holds the same prefix
            return instances[0], tokens[0]
        return np.concatenate(instances), np.concatenate(tokens)

    def size(self, instance: int) -> int:
        """Tokens `instance` is thought to hold in its prefix cache."""
        held = self._instances.get(instance)
        return held.pieces * GRAIN_TOKENS if held else 0

    def _drop(self, instance: int, held: _Instance, vllm_hash: Hashable) -> None:
        own = held.blocks.pop(vllm_hash, None)
        if own is not None:
            held.pieces -= len(own)
            for h in own:
                self._unhold(instance, h)

    def _hold(self, instance: int, our_hash: int) -> None:
        holders = self._holders.get(our_hash)
        if holders is None:
            self._holders[our_hash] = ~instance
        elif holders >= 0:
            self._holders[our_hash] = holders | 1 << instance
        elif ~holders != instance:
            self._holders[our_hash] = 1 << ~holders | 1 << instance

    def _unhold(self, instance: int, our_hash: int) -> None:
        holders = self._holders.get(our_hash)
        if holders is None or holders == ~instance:
            self._holders.pop(our_hash, None)
        elif holders >= 0:
            rest = holders & ~(1 << instance)
            self._holders[our_hash] = ~(rest.bit_length() - 1) if rest & (rest - 1) == 0 else rest


def _bits(holders: int | None) -> int:
    """A piece's holders as a bitmap (0: none)."""
    return 0 if holders is None else holders if holders >= 0 else 1 << ~holders


def _count(holders: int | None) -> int:
    return 0 if holders is None else holders.bit_count() if holders >= 0 else 1


def _members(bits: int) -> np.ndarray:
    """The instance numbers set in a bitmap, ascending."""
    if bits & (bits - 1) == 0:
        return np.array([bits.bit_length() - 1] if bits else [], np.int64)
    raw = np.frombuffer(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), np.uint8)
    return np.unpackbits(raw, bitorder="little").nonzero()[0]
