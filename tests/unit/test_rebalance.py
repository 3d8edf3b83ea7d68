"""Unit tests of rebalancing plans (`sharding.rebalance`) and of `Book.forget` (a handoff's release)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.accounts import AccountType
from ledger.book import Book
from ledger.invariants import InvariantViolation
from ledger.journal import Line
from sharding.rebalance import (
    MOVE_SLOTS_MAX,
    Move,
    PlanError,
    apply_moves,
    even_shares,
    next_shard_ids,
    parse_slots,
    plan_balance,
    plan_remove,
    plan_slots,
    slot_counts,
    slot_ranges,
)
from sharding.slots import SLOT_COUNT, SlotMap, even_slot_map


def counts(slot_map: SlotMap) -> Counter[int]:
    return Counter(shard for _, shard in slot_map.as_rows())


def test_adding_shards_spreads_slots_evenly_and_moves_only_the_surplus() -> None:
    """4 -> 6 shards: every shard ends with 2730 or 2731 slots; no slot moves between old shards."""
    before = SlotMap(even_slot_map(4))
    plan = plan_balance(before, [0, 1, 2, 3, 4, 5])
    after = apply_moves(before, plan)
    assert set(counts(after).values()) <= {SLOT_COUNT // 6, SLOT_COUNT // 6 + 1}
    assert all(move.target in (4, 5) and move.source in (0, 1, 2, 3) for move in plan)
    moved = sum(len(m.slots) for m in plan)
    assert moved == counts(after)[4] + counts(after)[5] == 2 * (SLOT_COUNT // 6)
    assert all(len(m.slots) <= MOVE_SLOTS_MAX for m in plan)


def test_a_balanced_map_needs_no_move() -> None:
    """Planning again after a plan ran is a no-op (idempotent)."""
    slot_map = SlotMap(even_slot_map(4))
    assert plan_balance(slot_map, [0, 1, 2, 3]) == []
    after = apply_moves(slot_map, plan_balance(slot_map, [0, 1, 2, 3, 7]))
    assert plan_balance(after, [0, 1, 2, 3, 7]) == []


def test_removing_a_shard_empties_it_and_keeps_the_rest() -> None:
    """Only the removed shard's slots move, spread over the remaining shards."""
    before = SlotMap(even_slot_map(4))
    plan = plan_remove(before, 2, [0, 1, 2, 3])
    after = apply_moves(before, plan)
    assert after.slots_of(2) == []
    assert {m.source for m in plan} == {2}
    assert {m.target for m in plan} == {0, 1, 3}
    for shard in (0, 1, 3):
        assert set(before.slots_of(shard)) <= set(after.slots_of(shard))
    assert max(counts(after).values()) - min(counts(after).values()) <= 1


def test_the_last_shard_cannot_be_removed_and_unknown_shards_are_refused() -> None:
    """Operator errors are `PlanError`s (400), never partial plans."""
    one = SlotMap(even_slot_map(1))
    with pytest.raises(PlanError, match="last shard"):
        plan_remove(one, 0, [0])
    with pytest.raises(PlanError, match="does not exist"):
        plan_remove(one, 5, [0])
    with pytest.raises(PlanError, match="does not exist"):
        plan_slots(one, [1, 2], 9, [0])
    with pytest.raises(PlanError, match="outside"):
        plan_slots(one, [SLOT_COUNT], 0, [0])


def test_explicit_moves_group_per_source_and_skip_slots_already_there() -> None:
    """Slots 0 (shard 0), 4096 (shard 1) and 8192 (shard 2) to shard 2: two moves."""
    slot_map = SlotMap(even_slot_map(4))
    plan = plan_slots(slot_map, [4096, 0, 8192, 0], 2, [0, 1, 2, 3])
    assert plan == [Move((0,), 0, 2), Move((4096,), 1, 2)]
    back = plan_slots(apply_moves(slot_map, plan), [0], 0, [0, 1, 2, 3])
    assert back == [Move((0,), 2, 0)]


def test_moves_are_checked_against_the_map() -> None:
    """A move naming the wrong source (a stale plan) is an invariant violation, not a silent switch."""
    with pytest.raises(InvariantViolation):
        apply_moves(SlotMap(even_slot_map(4)), [Move((0,), 1, 2)])
    with pytest.raises(InvariantViolation):
        Move((0,), 1, 1)


def test_new_shard_ids_never_reuse_retired_ones() -> None:
    """Ids continue after every id ever used, so a retired shard's stream stays closed."""
    assert next_shard_ids([0, 1, 2, 3], 2) == [4, 5]
    assert next_shard_ids([0, 1, 9], 1) == [10]
    with pytest.raises(PlanError):
        next_shard_ids([0], 0)


def test_slot_specs_and_ranges() -> None:
    """`"100-103"` style ranges, numbers, duplicates; shown back as compact ranges."""
    assert parse_slots([5, "100-103", "7", 5]) == [5, 7, 100, 101, 102, 103]
    assert slot_ranges([5, 7, 100, 101, 102, 103]) == [(5, 5), (7, 7), (100, 103)]
    for bad in (["x"], ["5-2"], [SLOT_COUNT], []):
        with pytest.raises(PlanError):
            parse_slots(bad)
    assert even_shares(10, [3, 1, 2]) == {1: 4, 2: 3, 3: 3}
    assert slot_counts(SlotMap(even_slot_map(2)), [0, 1, 5]) == {0: 8192, 1: 8192, 5: 0}


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(1, 8),
    extra=st.lists(st.integers(8, 40), max_size=4, unique=True),
    drop=st.lists(st.integers(0, 7), max_size=3, unique=True),
)
def test_any_plan_covers_every_slot_and_balances(start: int, extra: list[int], drop: list[int]) -> None:
    """From any even map, to any shard set: every slot owned by a wanted shard, shares within 1."""
    slot_map = SlotMap(even_slot_map(start))
    wanted = sorted({*range(start), *extra} - set(drop)) or [0]
    after = apply_moves(slot_map, plan_balance(slot_map, wanted))
    owners = counts(after)
    assert set(owners) <= set(wanted)
    shares = [owners.get(s, 0) for s in wanted]
    assert max(shares) - min(shares) <= 1


def test_book_forget_drops_accounts_and_a_reload_restores_them() -> None:
    """Release forgets a slot's accounts (as if never loaded); acquiring again loads stored figures."""
    book = Book()
    book.load_account("asset:a", AccountType.ASSET, True)
    book.load_balance(("asset:a", "USD"), [500, 100, 0, 0])
    book.load_balance(("asset:a", "EUR"), [7, 0, 0, 0])
    book.load_account("asset:b", AccountType.ASSET, False)
    assert book.forget(["asset:a", "asset:unknown"]) == 1
    assert book.account("asset:a") is None and len(book.accounts) == 1
    assert book.balance(("asset:a", "USD")) == [0, 0, 0, 0] == book.balance(("asset:a", "EUR"))
    book.load_account("asset:a", AccountType.ASSET, True)
    book.load_balance(("asset:a", "USD"), [600, 100, 0, 0])
    assert book.balance(("asset:a", "USD")) == [600, 100, 0, 0]
    assert book.available(("asset:a", "USD")) == 500
    assert len(book.accounts) == 2


def test_book_forget_refuses_reserved_accounts() -> None:
    """A reservation means a prepared cross-shard part still to apply: the drain must come first."""
    book = Book()
    book.load_account("asset:a", AccountType.ASSET, False)
    book.reserve("tx-1", (Line(0, "asset:a", AccountType.ASSET, "debit", 5, "USD", {}),), force=True)
    with pytest.raises(InvariantViolation):
        book.forget(["asset:a"])
