"""Rebalancing plans: which slots move from which shard to which, when shards come and go.

Pure (no I/O, no clock): the node's resharding orchestrator (`api/resharding.py`) asks for a
plan, checks it, and executes its moves one by one with the handoff described in
docs/ARCHITECTURE.md, "Resharding". A plan moves as few slots as it can: a shard keeps every
slot it may keep and gives away only its surplus over the even share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ledger.invariants import check
from sharding.slots import SLOT_COUNT, SlotMap

MOVE_SLOTS_MAX: Final = 2048
"""Slots per move: bounds the accounts one handoff reloads, so each freeze stays short."""


class PlanError(ValueError):
    """An operator's request cannot be planned (unknown shard, bad slot, last shard, ...)."""


@dataclass(frozen=True, slots=True)
class Move:
    """Move `slots` (all owned by `source`) to `target`."""

    slots: tuple[int, ...]
    source: int
    target: int

    def __post_init__(self) -> None:
        check(self.source != self.target, f"a move from shard {self.source} to itself")
        check(len(self.slots) > 0, "a move of no slots")


def even_shares(total: int, shards: Sequence[int]) -> dict[int, int]:
    """How many of `total` slots each shard should own: equal, the remainder to the lowest ids."""
    check(len(shards) > 0, "no shards to share slots among")
    ordered = sorted(shards)
    base, extra = divmod(total, len(ordered))
    return {shard: base + (1 if index < extra else 0) for index, shard in enumerate(ordered)}


def _owned(slot_map: SlotMap, shards: Iterable[int]) -> dict[int, list[int]]:
    owned: dict[int, list[int]] = {shard: [] for shard in shards}
    for slot, shard in slot_map.as_rows():
        owned.setdefault(shard, []).append(slot)
    return owned


def _chunked(slots: list[int], source: int, target: int) -> list[Move]:
    return [
        Move(tuple(slots[i : i + MOVE_SLOTS_MAX]), source, target)
        for i in range(0, len(slots), MOVE_SLOTS_MAX)
    ]


def plan_balance(slot_map: SlotMap, shards: Sequence[int]) -> list[Move]:
    """Moves that leave every slot on one of `shards`, each owning its even share.

    Shards not in `shards` give away every slot; a shard over its share gives its highest
    slots; slots go to shards under their share, lowest id first. Minimal: a slot moves only
    if its shard is over its share (or leaving).
    """
    if not shards:
        raise PlanError("at least one shard must remain")
    share = even_shares(SLOT_COUNT, shards)
    owned = _owned(slot_map, shards)
    surplus: list[tuple[int, int]] = []  # (slot, source)
    for shard, slots in sorted(owned.items()):
        keep = share.get(shard, 0)
        surplus.extend((slot, shard) for slot in slots[keep:])
    moves: dict[tuple[int, int], list[int]] = {}
    cursor = 0
    for target in sorted(share):
        need = share[target] - min(len(owned[target]), share[target])
        for slot, source in surplus[cursor : cursor + need]:
            moves.setdefault((source, target), []).append(slot)
        cursor += need
    check(cursor == len(surplus), "every surplus slot finds a target")
    plan = [
        move for (source, target), slots in sorted(moves.items()) for move in _chunked(slots, source, target)
    ]
    check(sum(len(m.slots) for m in plan) == len(surplus), "the plan moves exactly the surplus")
    return plan


def plan_slots(slot_map: SlotMap, slots: Iterable[int], target: int, shards: Iterable[int]) -> list[Move]:
    """Moves of explicit `slots` to `target` (one per source shard); slots already there are skipped."""
    active = set(shards)
    if target not in active:
        raise PlanError(f"shard {target} does not exist (active shards: {sorted(active)})")
    wanted = sorted(set(slots))
    bad = [slot for slot in wanted if not 0 <= slot < SLOT_COUNT]
    if bad:
        raise PlanError(f"slots outside 0..{SLOT_COUNT - 1}: {bad[:5]}")
    per_source: dict[int, list[int]] = {}
    for slot in wanted:
        source = slot_map.shard_of_slot(slot)
        if source != target:
            per_source.setdefault(source, []).append(slot)
    return [move for source, group in sorted(per_source.items()) for move in _chunked(group, source, target)]


def plan_remove(slot_map: SlotMap, shard: int, shards: Iterable[int]) -> list[Move]:
    """Moves that empty `shard`, spreading its slots so the others end up as even as possible."""
    active = sorted(set(shards))
    if shard not in active:
        raise PlanError(f"shard {shard} does not exist (active shards: {active})")
    remaining = [s for s in active if s != shard]
    if not remaining:
        raise PlanError("the last shard cannot be removed")
    plan = [m for m in plan_balance(slot_map, remaining) if m.source == shard]
    rest = apply_moves(slot_map, plan)
    check(not rest.slots_of(shard), f"the plan empties shard {shard}")
    return plan


def next_shard_ids(known: Iterable[int], count: int) -> list[int]:
    """Ids for `count` new shards: after every id ever used (retired ones included), never reused."""
    if not 1 <= count <= 64:
        raise PlanError(f"add 1..64 shards at a time, not {count}")
    start = max(known, default=-1) + 1
    if start + count > 1024:
        raise PlanError("at most 1024 shard ids")
    return list(range(start, start + count))


def apply_moves(slot_map: SlotMap, moves: Iterable[Move]) -> SlotMap:
    """The slot map after `moves` (each checked against the map as it is when the move runs)."""
    rows = dict(slot_map.as_rows())
    for move in moves:
        for slot in move.slots:
            check(rows[slot] == move.source, f"slot {slot} is on shard {rows[slot]}, not {move.source}")
            rows[slot] = move.target
    return SlotMap.from_rows(rows)


def slot_ranges(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Slots as inclusive ranges, e.g. [0, 1, 2, 7] -> [(0, 2), (7, 7)] (for display)."""
    ranges: list[tuple[int, int]] = []
    for slot in sorted(set(slots)):
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges


def slot_counts(slot_map: SlotMap, shards: Iterable[int]) -> Mapping[int, int]:
    """Slots per shard (0 for a shard owning none)."""
    counts = {shard: 0 for shard in shards}
    for _, shard in slot_map.as_rows():
        counts[shard] = counts.get(shard, 0) + 1
    return counts


def parse_slots(specs: Iterable[int | str]) -> list[int]:
    """Slots from an operator's list: numbers and inclusive ranges (`"100-199"`), sorted, unique."""
    slots: set[int] = set()
    for spec in specs:
        if isinstance(spec, int):
            first = last = spec
        else:
            low, sep, high = spec.strip().partition("-")
            try:
                first, last = int(low), int(high if sep else low)
            except ValueError:
                raise PlanError(f"not a slot or slot range: {spec!r}") from None
        if not 0 <= first <= last < SLOT_COUNT:
            raise PlanError(f"slots must be within 0..{SLOT_COUNT - 1} (low-high): {spec!r}")
        slots.update(range(first, last + 1))
    if not slots:
        raise PlanError("no slots given")
    return sorted(slots)
