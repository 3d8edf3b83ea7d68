"""Slots and the slot map: which shard owns an account.

An account's slot is `crc32(account_id as UTF-8) mod 16384` (zlib's CRC-32). The slot
map assigns each of the 16,384 slots to one shard; it lives in PostgreSQL (`slot_map`)
and is loaded at start-up.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Final

from ledger.invariants import check

SLOT_COUNT: Final = 16_384


def slot_of(account_id: str) -> int:
    """The hash slot of an account."""
    return zlib.crc32(account_id.encode()) % SLOT_COUNT


def even_slot_map(shard_count: int) -> tuple[int, ...]:
    """A fresh map: contiguous, even ranges of slots per shard 0..shard_count-1."""
    check(1 <= shard_count <= 1024, f"shard count {shard_count} outside 1..1024")
    return tuple(slot * shard_count // SLOT_COUNT for slot in range(SLOT_COUNT))


class SlotMap:
    """An immutable view of slot -> shard, with a per-account cache."""

    def __init__(self, shard_of_slot: Iterable[int]) -> None:
        self._shard_of_slot = tuple(shard_of_slot)
        check(len(self._shard_of_slot) == SLOT_COUNT, "slot map must cover every slot")
        self.shards: tuple[int, ...] = tuple(sorted(set(self._shard_of_slot)))
        check(all(shard >= 0 for shard in self.shards), "shard ids are non-negative")
        self._cache: dict[str, int] = {}

    @classmethod
    def from_rows(cls, rows: Mapping[int, int]) -> SlotMap:
        """Build from `slot -> shard` rows as stored in PostgreSQL."""
        check(set(rows) == set(range(SLOT_COUNT)), "stored slot map is incomplete")
        return cls(rows[slot] for slot in range(SLOT_COUNT))

    def shard_of_slot(self, slot: int) -> int:
        """The shard owning a slot."""
        return self._shard_of_slot[slot]

    def shard_of(self, account_id: str) -> int:
        """The shard owning an account."""
        shard = self._cache.get(account_id)
        if shard is None:
            shard = self._shard_of_slot[slot_of(account_id)]
            if len(self._cache) < 1_000_000:
                self._cache[account_id] = shard
        return shard

    def slots_of(self, shard: int) -> list[int]:
        """Every slot a shard owns."""
        return [slot for slot, owner in enumerate(self._shard_of_slot) if owner == shard]

    def as_rows(self) -> list[tuple[int, int]]:
        """(slot, shard) pairs for storing."""
        return list(enumerate(self._shard_of_slot))
