"""Which expert goes into which slot: pure decisions over one layer's slot table.

A slot table is `slot_expert[s]` = the expert in slot s, or -1 when the slot is free. The
buffer (`buffer.py`) applies the loads these functions return; nothing here touches tensors.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from pdserve.config.experts import EvictionPolicy

FREE = -1


@dataclass
class SlotTable:
    """One layer's residency: what each slot holds and when it was loaded and last used
    (in steps of this layer, a logical clock)."""

    slot_expert: list[int]
    loaded_at: list[int] = field(default_factory=list)
    used_at: list[int] = field(default_factory=list)
    clock: int = 0

    @classmethod
    def empty(cls, slots: int) -> SlotTable:
        return cls([FREE] * slots, [0] * slots, [0] * slots)

    def slot_of(self) -> dict[int, int]:
        return {e: s for s, e in enumerate(self.slot_expert) if e != FREE}


def victim_order(table: SlotTable, keep: Collection[int], policy: EvictionPolicy,
                 hot: Collection[int] = ()) -> list[int]:
    """Slots in the order they should be given up: free ones, then those holding experts the
    current batch does not use (`keep` are the experts it does use, never evicted), ranked by
    the policy. Ties break on the slot index so decisions are reproducible."""
    free = [s for s, e in enumerate(table.slot_expert) if e == FREE]
    idle = [s for s, e in enumerate(table.slot_expert) if e != FREE and e not in keep]
    if policy == "lifo":
        idle.sort(key=lambda s: (-table.loaded_at[s], s))
    elif policy == "lru":
        idle.sort(key=lambda s: (table.used_at[s], s))
    else:  # pinned_hot: the hot set is evicted only when nothing else can go
        idle.sort(key=lambda s: (table.slot_expert[s] in hot, table.used_at[s], s))
    return free + idle


def plan_loads(table: SlotTable, needed: Sequence[int], policy: EvictionPolicy,
               hot: Collection[int] = ()) -> list[tuple[int, int]]:
    """`(slot, expert)` loads that make every expert in `needed` resident.

    `needed` must fit in the slots (the buffer splits a batch that needs more into rounds)."""
    if len(needed) > len(table.slot_expert):
        raise ValueError(f"{len(needed)} experts cannot be resident in {len(table.slot_expert)} slots at once")
    resident = table.slot_of()
    missing = [e for e in needed if e not in resident]
    victims = victim_order(table, set(needed), policy, hot)
    return list(zip(victims, missing, strict=False))  # missing never outnumbers the slots


def plan_prefetch(table: SlotTable, likely: Sequence[int], limit: int, policy: EvictionPolicy,
                  hot: Collection[int] = ()) -> list[tuple[int, int]]:
    """`(slot, expert)` loads for experts expected next (most likely first), at most `limit`.

    A prefetch only takes a free slot or one whose expert is not itself expected, so it never
    evicts something more likely to be used than what it brings in."""
    resident = table.slot_of()
    wanted = [e for e in likely if e not in resident][:limit]
    victims = victim_order(table, set(likely), policy, hot)
    return list(zip(victims, wanted, strict=False))


def commit(table: SlotTable, loads: Sequence[tuple[int, int]]) -> None:
    """Record loads as done at the current clock."""
    for slot, expert in loads:
        table.slot_expert[slot] = expert
        table.loaded_at[slot] = table.clock
        table.used_at[slot] = table.clock


def touch(table: SlotTable, experts: Collection[int]) -> None:
    """Mark experts used by this step and advance the clock."""
    table.clock += 1
    for s, e in enumerate(table.slot_expert):
        if e in experts:
            table.used_at[s] = table.clock


def split_rounds(token_experts: Sequence[Sequence[int]], resident: Collection[int],
                 slots: int) -> list[tuple[list[int], list[int]]]:
    """A batch that needs more experts than there are slots, as rounds of whole tokens:
    `(token indices, experts they use)`, each round's experts fitting the slots.

    Whole tokens, not experts: the fused kernel reduces a token's experts in its own order,
    so a token split across rounds would not sum bit for bit the same. Tokens whose experts
    are all resident go first, so the first round loads nothing for them."""
    resident = set(resident)
    ready = [t for t, es in enumerate(token_experts) if resident.issuperset(es)]
    order = ready + [t for t, es in enumerate(token_experts) if not resident.issuperset(es)]
    rounds: list[tuple[list[int], list[int]]] = []
    tokens: list[int] = []
    experts: dict[int, None] = {}  # insertion-ordered set
    for t in order:
        wanted = dict.fromkeys(token_experts[t])
        if tokens and len(experts.keys() | wanted.keys()) > slots:
            rounds.append((tokens, list(experts)))
            tokens, experts = [], {}
        tokens.append(t)
        experts.update(wanted)
    if tokens:
        rounds.append((tokens, list(experts)))
    return rounds
