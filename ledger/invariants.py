"""Always-on invariant checks.

`assert` is stripped by `python -O`; a ledger must keep its invariants in production, so
every room uses `check()` instead. A failed check means our own code is wrong (not the
client's input): the process (or actor) crashes and restarts from PostgreSQL.
"""

from __future__ import annotations


class InvariantViolation(RuntimeError):
    """An internal invariant does not hold; never caught to continue normal work."""


def check(condition: bool, message: str, *args: object) -> None:
    """Raise `InvariantViolation(message % args)` unless `condition` holds.

    On hot paths pass the values as `args` rather than an f-string: the message is then only
    formatted when the check fails (an f-string is formatted on every call, a few hundred ns
    each, thousands of times per batch).
    """
    if not condition:
        raise InvariantViolation(message % args if args else message)
