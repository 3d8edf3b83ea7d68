"""Every integrity finding of `ledger-node check`, in one call (also run by `ledger-node restore`).

The ledger check (`store.check`: balances, pending amounts, balancing, lines, chains), the signed
layer (`store.check_signatures`: hashes, batch roots, signatures, the latest checkpoint) and the
audit chain with its signatures (`store.audit`).
"""

from __future__ import annotations

import asyncpg

from signer.keys import verify_signature
from store.audit import verify_audit_chain
from store.check import Problem, run_check
from store.check_signatures import check_signatures


async def integrity_problems(conn: asyncpg.Connection) -> list[Problem]:
    """Every problem `ledger-node check` reports; empty when the stored ledger is coherent and signed."""
    problems = await run_check(conn)
    problems += await check_signatures(conn)
    problems += [
        Problem("audit_chain", "audit events", text)
        for text in await verify_audit_chain(conn, check_signature=verify_signature)
    ]
    return problems
