"""`ledger-node check`'s batch window: the chain rows a signed batch covers, found by bisection."""

from __future__ import annotations

from typing import Any

from store.check_signatures import _window


def test_window_is_the_rows_between_first_and_last_seq_duplicates_included() -> None:
    """Tried: a chain 1..10 with seq 5 stored twice (a tampered store) and windows inside, at the
    edges, past the end and empty -> exactly the rows a full scan would pick, in order (the check
    used to scan every row per batch: quadratic on a long soak's ~10^5 batches)."""
    rows: list[Any] = [{"seq": s, "n": i} for i, s in enumerate([1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10])]
    seqs = [r["seq"] for r in rows]

    def scan(first: int, last: int) -> list[Any]:
        return [r for r in rows if first <= r["seq"] <= last]

    for first, last in ((3, 5), (1, 1), (10, 10), (5, 5), (9, 12), (11, 20), (0, 0), (4, 3), (1, 10)):
        assert _window(rows, seqs, first, last) == scan(first, last), (first, last)
    assert [r["n"] for r in _window(rows, seqs, 5, 6)] == [4, 5, 6]
