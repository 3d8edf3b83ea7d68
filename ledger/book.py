"""A shard's in-memory book: account policies, balances, and cross-shard reservations.

The book is the single writer's view of its accounts. Postings go through a `Staging`
(one group-commit batch): each journal is checked against balances as they would be after
the journals staged before it, then added. When the batch is durable, `apply()` merges it;
if the batch fails, the staging is dropped and the book is untouched.

Cross-shard journals reserve their part first (`reserve`), which makes the amounts that
reduce a guarded balance unavailable to other postings until the coordinator's decision
commits (`stage_reserved`) or releases (`release`) them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.accounts import AccountType, normal_balance
from ledger.errors import ErrorCode, Rejection
from ledger.invariants import check
from ledger.journal import Line

BalanceKey = tuple[str, str]  # (account_id, currency)

# Balance vector indices.
DP, CP, DPEND, CPEND = 0, 1, 2, 3


@dataclass(slots=True)
class AccountInfo:
    """What the book knows of an account: its type and overdraft policy."""

    account_type: AccountType
    no_negative: bool = False


@dataclass(slots=True)
class Staging:
    """Posted deltas and new accounts of one batch, not yet durable."""

    deltas: dict[BalanceKey, list[int]] = field(default_factory=dict)
    new_accounts: dict[str, AccountType] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)

    def add(self, line: Line) -> None:
        """Add one line's amount to the posted deltas."""
        delta = self.deltas.get((line.account_id, line.currency))
        if delta is None:
            delta = self.deltas[(line.account_id, line.currency)] = [0, 0]
        delta[0 if line.is_debit else 1] += line.amount


class Book:
    """Balances and policies of the accounts one shard owns."""

    def __init__(self) -> None:
        self.accounts: dict[str, AccountInfo] = {}
        self.balances: dict[BalanceKey, list[int]] = {}
        self.reserved: dict[BalanceKey, list[int]] = {}
        self.reservations: dict[str, tuple[Line, ...]] = {}

    # -- loading ---------------------------------------------------------------------------
    def load_account(self, account_id: str, account_type: AccountType, no_negative: bool) -> None:
        """Register an account read from the store."""
        self.accounts[account_id] = AccountInfo(account_type, no_negative)

    def load_balance(self, key: BalanceKey, vector: Iterable[int]) -> None:
        """Register a balance read from the store: posted/pending debits and credits."""
        values = list(vector)
        check(len(values) == 4 and min(values) >= 0, f"bad stored balance for {key}: {values}")
        self.balances[key] = values

    # -- reads -----------------------------------------------------------------------------
    def balance(self, key: BalanceKey) -> list[int]:
        """Posted and pending debits/credits (zeros for an unknown key)."""
        return list(self.balances.get(key, (0, 0, 0, 0)))

    def available(self, key: BalanceKey, staging: Staging | None = None, exclude: str | None = None) -> int:
        """Normal-side balance minus pending and reserved amounts that would reduce it."""
        info = self.accounts.get(key[0])
        if info is None:  # not created yet: nothing posted, no policy
            return 0
        vector = self.balances.get(key, (0, 0, 0, 0))
        debits, credits = vector[DP], vector[CP]
        if staging is not None and key in staging.deltas:
            debits += staging.deltas[key][0]
            credits += staging.deltas[key][1]
        reserved = self.reserved.get(key, (0, 0))
        if exclude is not None:
            reserved = self._without(key, reserved, exclude)
        if info.account_type.debit_normal:
            reducing = vector[CPEND] + reserved[1]
        else:
            reducing = vector[DPEND] + reserved[0]
        return normal_balance(info.account_type, debits, credits) - reducing

    def _without(self, key: BalanceKey, reserved: Iterable[int], txid: str) -> list[int]:
        totals = list(reserved)
        for line in self.reservations.get(txid, ()):
            if (line.account_id, line.currency) == key:
                totals[0 if line.is_debit else 1] -= line.amount
        return totals

    # -- checks ----------------------------------------------------------------------------
    def _ensure_accounts(self, lines: Iterable[Line], staging: Staging) -> None:
        for line in lines:
            if line.account_id not in self.accounts and line.account_id not in staging.new_accounts:
                staging.new_accounts[line.account_id] = line.account_type

    def shortfall(
        self, lines: tuple[Line, ...], staging: Staging | None = None, exclude: str | None = None
    ) -> Rejection | None:
        """INSUFFICIENT_FUNDS if these lines would take a guarded balance below zero."""
        net: dict[BalanceKey, int] = {}
        for line in lines:
            info = self.accounts.get(line.account_id)
            if info is None or not info.no_negative:
                continue
            grows = line.is_debit == info.account_type.debit_normal
            key = (line.account_id, line.currency)
            net[key] = net.get(key, 0) + (line.amount if grows else -line.amount)
        for key, delta in net.items():
            if delta >= 0:
                continue
            available = self.available(key, staging, exclude)
            if available + delta < 0:
                return Rejection(
                    ErrorCode.INSUFFICIENT_FUNDS,
                    f"account {key[0]} has {available} {key[1]} available, the journal needs {-delta}",
                    {"account_id": key[0], "currency": key[1], "available": available, "requested": -delta},
                )
        return None

    # -- single-shard postings --------------------------------------------------------------
    def stage(self, lines: tuple[Line, ...], staging: Staging) -> Rejection | None:
        """Check these lines against the book plus the staging; add them if they pass."""
        rejection = self.shortfall(lines, staging)
        if rejection is not None:
            return rejection
        self._ensure_accounts(lines, staging)
        for line in lines:
            staging.add(line)
        return None

    def apply(self, staging: Staging) -> None:
        """Merge a durable staging into the book."""
        for account_id, account_type in staging.new_accounts.items():
            self.accounts.setdefault(account_id, AccountInfo(account_type))
        for key, (debits, credits) in staging.deltas.items():
            vector = self.balances.get(key)
            if vector is None:
                vector = self.balances[key] = [0, 0, 0, 0]
            vector[DP] += debits
            vector[CP] += credits
            check(vector[DP] >= 0 and vector[CP] >= 0, f"negative posted totals for {key}")
        for txid in staging.released:
            self.release(txid)

    # -- cross-shard parts -------------------------------------------------------------------
    def reserve(self, txid: str, lines: tuple[Line, ...], force: bool = False) -> Rejection | None:
        """Reserve a cross-shard part (idempotent). `force` skips the check (recovery reload)."""
        if txid in self.reservations:
            # A reservation reloaded after a restart: vote on whether the part fits without
            # it, but keep holding the funds either way. The coordinator may already have
            # logged COMMIT on this shard's YES from before the crash; releasing here would
            # let other postings spend money that COMMIT still needs (found by tests/sim).
            return None if force else self.shortfall(lines, exclude=txid)
        if not force:
            rejection = self.shortfall(lines)
            if rejection is not None:
                return rejection
        for line in lines:
            key = (line.account_id, line.currency)
            totals = self.reserved.get(key)
            if totals is None:
                totals = self.reserved[key] = [0, 0]
            totals[0 if line.is_debit else 1] += line.amount
        self.reservations[txid] = lines
        return None

    def release(self, txid: str) -> bool:
        """Drop a reservation; True if there was one."""
        lines = self.reservations.pop(txid, None)
        if lines is None:
            return False
        for line in lines:
            key = (line.account_id, line.currency)
            totals = self.reserved[key]
            totals[0 if line.is_debit else 1] -= line.amount
            check(min(totals) >= 0, f"reservation totals went negative for {key}")
            if totals == [0, 0]:
                del self.reserved[key]
        return True

    def stage_reserved(self, txid: str, lines: tuple[Line, ...], staging: Staging) -> None:
        """Stage a committed part without a check (it was checked at prepare and is reserved)."""
        self._ensure_accounts(lines, staging)
        for line in lines:
            staging.add(line)
        staging.released.append(txid)
