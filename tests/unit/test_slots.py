"""Unit tests of slots and the slot map (`sharding.slots`)."""

from __future__ import annotations

import zlib
from collections import Counter

import pytest

from ledger.invariants import InvariantViolation
from sharding.slots import SLOT_COUNT, SlotMap, even_slot_map, slot_of

# Computed once with zlib.crc32(account_id.encode()) % 16384, independently of the module:
# a change of the hash would move every account to another shard.
GOLDEN = {
    "asset:cash": 6220,
    "liability:customer:42": 9082,
    "expense:fees": 14131,
    "revenue:sales.eu": 11217,
}


def test_slot_of_golden_values() -> None:
    """Slots of fixed account ids never change."""
    assert {account: slot_of(account) for account in GOLDEN} == GOLDEN


def test_slot_of_is_crc32_mod_16384() -> None:
    """The slot is zlib's CRC-32 of the UTF-8 id, mod 16384, always in range."""
    for i in range(500):
        account = f"liability:user:{i}"
        slot = slot_of(account)
        assert slot == zlib.crc32(account.encode("utf-8")) % 16384
        assert 0 <= slot < SLOT_COUNT


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7, 16, 1000, 1024])
def test_even_slot_map_covers_all_slots_balanced(shards: int) -> None:
    """Every slot is owned, every shard owns slots, and sizes differ by at most one."""
    mapping = even_slot_map(shards)
    assert len(mapping) == SLOT_COUNT
    sizes = Counter(mapping)
    assert set(sizes) == set(range(shards))
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert list(mapping) == sorted(mapping)  # contiguous ranges


@pytest.mark.parametrize("shards", [0, 1025])
def test_even_slot_map_rejects_bad_shard_counts(shards: int) -> None:
    """Shard counts outside 1..1024 are refused."""
    with pytest.raises(InvariantViolation):
        even_slot_map(shards)


def test_slot_map_round_trips_through_rows() -> None:
    """A map stored as rows loads back to the same owners."""
    original = SlotMap(even_slot_map(4))
    loaded = SlotMap.from_rows(dict(original.as_rows()))
    assert loaded.shards == (0, 1, 2, 3)
    for account, slot in GOLDEN.items():
        assert loaded.shard_of(account) == original.shard_of(account)
        assert loaded.shard_of(account) == loaded.shard_of_slot(slot)
    assert sum(len(loaded.slots_of(s)) for s in loaded.shards) == SLOT_COUNT


def test_slot_map_from_rows_rejects_incomplete_maps() -> None:
    """A stored map missing a slot (or with an out-of-range slot) is refused."""
    rows = dict(enumerate(even_slot_map(2)))
    del rows[SLOT_COUNT - 1]
    with pytest.raises(InvariantViolation):
        SlotMap.from_rows(rows)
    with pytest.raises(InvariantViolation):
        SlotMap.from_rows({**dict(enumerate(even_slot_map(2))), SLOT_COUNT: 0})
    with pytest.raises(InvariantViolation):
        SlotMap.from_rows({})


def test_slot_map_rejects_wrong_length() -> None:
    """A map must have exactly one owner per slot."""
    with pytest.raises(InvariantViolation):
        SlotMap([0] * (SLOT_COUNT - 1))
