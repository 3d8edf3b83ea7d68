"""Always-on invariant checks.

`assert` is stripped by `python -O`; a ledger must keep its invariants in production, so
every room uses `check()` instead. A failed check means our own code is wrong (not the
client's input): the process (or actor) crashes and restarts from PostgreSQL.
"""

from __future__ import annotations


class InvariantViolation(RuntimeError):
    """An internal invariant does not hold; never caught to continue normal work."""


def check(condition: bool, message: str) -> None:
    """Raise `InvariantViolation(message)` unless `condition` holds."""
    if not condition:
        raise InvariantViolation(message)
