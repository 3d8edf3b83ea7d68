"""A shard's in-memory book: account policies, balances, and cross-shard reservations.

The book is the single writer's view of its accounts. Postings go through a `Staging`
(one group-commit batch): each journal is checked against balances as they would be after
the journals staged before it, then added. When the batch is durable, `apply()` merges it;
if the batch fails, the staging is dropped and the book is untouched.

Holds (pending amounts, REQUIREMENTS L6) live in the pending columns: `hold` checks a hold's
lines like a posting and stages them as pending deltas; posting a hold (`stage_hold_post`)
releases its pending amounts and stages the posted (possibly smaller) ones; voiding or expiry
(`stage_hold_release`) only releases. Pending amounts that would reduce a guarded balance are
unavailable to other postings, exactly like reservations.

Cross-shard journals reserve their part first (`reserve`), which makes the amounts that
reduce a guarded balance unavailable to other postings until the coordinator's decision
commits (`stage_reserved`) or releases (`release`) them.

Memory layout (a shard holds up to millions of accounts; target <= 300 bytes per account).
Per-account Python objects (tuples, lists, boxed ints, repeated strings) cost ~500 bytes, so
the book keeps columns indexed by small integers instead:

- `_rows: dict[str, int]` account id -> row; the only place an account id string lives.
  Rows are appended and never removed, so the dict's order is row order.
- `_kind: array('b')` per row: account type code (index in `AccountType`) | `NO_NEGATIVE`,
  or `NO_ACCOUNT` for a row that has a balance but no registered account.
- `_slot0: array('i')` / `_cur0: array('H')` per row: the balance slot and currency code of
  the row's first balance (`-1`: none). Most accounts have one currency; further currencies
  go to `_more: dict[int, int]` keyed `row << 16 | currency code` -> slot.
- Balance columns `array('q')` per slot: posted/pending debits/credits (unboxed int64, as
  the store's `bigint` columns).
- Currency codes are interned to small ints (`_currency_code` / `_currency_names`).

That is ~170 bytes per single-currency account (id string, its dict entry and row int, 7 bytes
of row columns, 32 bytes of balance). `accounts` and `balances` are read-only `Mapping` views
that build `AccountInfo` / `list` values on demand. Reservations are few and stay plain dicts.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from ledger.accounts import AccountType, normal_balance
from ledger.errors import ErrorCode, Rejection
from ledger.invariants import check
from ledger.journal import Line
from ledger.money import INT64_MAX

BalanceKey = tuple[str, str]  # (account_id, currency)

# Balance vector indices.
DP, CP, DPEND, CPEND = 0, 1, 2, 3

TYPES: tuple[AccountType, ...] = tuple(AccountType)
DEBIT_NORMAL: tuple[bool, ...] = tuple(t.debit_normal for t in TYPES)
NO_NEGATIVE = 8  # flag bit in `_kind`
TYPE_MASK = 7
NO_ACCOUNT = -1  # `_kind` of a row with a balance but no registered account
CURRENCY_SHIFT = 16  # `_more` key: row << 16 | currency code


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
    pending: dict[BalanceKey, list[int]] = field(default_factory=dict)

    def add(self, line: Line) -> None:
        """Add one line's amount to the posted deltas."""
        delta = self.deltas.get((line.account_id, line.currency))
        if delta is None:
            delta = self.deltas[(line.account_id, line.currency)] = [0, 0]
        delta[0 if line.is_debit else 1] += line.amount

    def add_pending(self, line: Line, sign: int) -> None:
        """Add (sign 1) or release (sign -1) one line's amount in the pending deltas."""
        delta = self.pending.get((line.account_id, line.currency))
        if delta is None:
            delta = self.pending[(line.account_id, line.currency)] = [0, 0]
        delta[0 if line.is_debit else 1] += sign * line.amount


class AccountsView(Mapping[str, AccountInfo]):
    """Read-only `account_id -> AccountInfo` view of a book (values built on demand)."""

    def __init__(self, book: Book) -> None:
        self._book = book

    def __getitem__(self, account_id: str) -> AccountInfo:
        info = self._book.account(account_id)
        if info is None:
            raise KeyError(account_id)
        return info

    def __contains__(self, account_id: object) -> bool:
        row = self._book._rows.get(account_id) if isinstance(account_id, str) else None
        return row is not None and self._book._kind[row] != NO_ACCOUNT

    def __iter__(self) -> Iterator[str]:
        kind = self._book._kind
        return (account_id for account_id, row in self._book._rows.items() if kind[row] != NO_ACCOUNT)

    def __len__(self) -> int:
        return self._book._account_count


class BalancesView(Mapping[BalanceKey, list[int]]):
    """Read-only `(account_id, currency) -> [dp, cp, dpend, cpend]` view (fresh lists)."""

    def __init__(self, book: Book) -> None:
        self._book = book

    def __getitem__(self, key: BalanceKey) -> list[int]:
        slot = self._book._slot(key)
        if slot < 0:
            raise KeyError(key)
        return self._book._vector(slot)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and self._book._slot(key) >= 0  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[BalanceKey]:
        book = self._book
        names = book._currency_names
        for account_id, row in book._rows.items():
            if book._slot0[row] >= 0:
                yield account_id, names[book._cur0[row]]
        if book._more:
            ids = list(book._rows)
            for packed in list(book._more):
                yield ids[packed >> CURRENCY_SHIFT], names[packed & 0xFFFF]

    def __len__(self) -> int:
        return len(self._book._dp)


class Book:
    """Balances and policies of the accounts one shard owns (column layout: module docstring)."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self._kind = array("b")
        self._slot0 = array("i")
        self._cur0 = array("H")
        self._more: dict[int, int] = {}
        self._account_count = 0
        self._dp = array("q")
        self._cp = array("q")
        self._dpend = array("q")
        self._cpend = array("q")
        self._currency_code: dict[str, int] = {}
        self._currency_names: list[str] = []
        self.accounts: Mapping[str, AccountInfo] = AccountsView(self)
        self.balances: Mapping[BalanceKey, list[int]] = BalancesView(self)
        self.reserved: dict[BalanceKey, list[int]] = {}
        self.reservations: dict[str, tuple[Line, ...]] = {}

    # -- layout ----------------------------------------------------------------------------
    def _row(self, account_id: str) -> int:
        """The row of this id, appended (with no account, no balance) if new."""
        row = self._rows.get(account_id)
        if row is None:
            row = self._rows[account_id] = len(self._kind)
            self._kind.append(NO_ACCOUNT)
            self._slot0.append(-1)
            self._cur0.append(0)
        return row

    def _slot(self, key: BalanceKey) -> int:
        """Balance slot of (account_id, currency), or -1."""
        row = self._rows.get(key[0])
        code = self._currency_code.get(key[1])
        if row is None or code is None:
            return -1
        if self._cur0[row] == code and self._slot0[row] >= 0:
            return self._slot0[row]
        return self._more.get(row << CURRENCY_SHIFT | code, -1)

    def _new_slot(self, key: BalanceKey) -> int:
        """Append a zero balance for this key (which must not have one yet); return its slot."""
        row = self._row(key[0])
        code = self._currency_code.get(key[1])
        if code is None:
            code = self._currency_code[key[1]] = len(self._currency_names)
            check(code <= 0xFFFF, "too many currencies")
            self._currency_names.append(key[1])
        slot = len(self._dp)
        self._dp.append(0)
        self._cp.append(0)
        self._dpend.append(0)
        self._cpend.append(0)
        if self._slot0[row] < 0:
            self._slot0[row], self._cur0[row] = slot, code
        else:
            self._more[row << CURRENCY_SHIFT | code] = slot
        return slot

    def _vector(self, slot: int) -> list[int]:
        return [self._dp[slot], self._cp[slot], self._dpend[slot], self._cpend[slot]]

    def footprint(self) -> dict[str, int]:
        """Bytes held by the book's structures (`sys.getsizeof`; for loadtests/memory.py)."""
        from sys import getsizeof

        columns = (self._kind, self._slot0, self._cur0, self._dp, self._cp, self._dpend, self._cpend)
        out = {
            "rows dict (hash table)": getsizeof(self._rows),
            "account id strings (rows keys)": sum(getsizeof(k) for k in self._rows),
            "row index ints (rows values)": sum(getsizeof(v) for v in self._rows.values() if v > 256),
            "row and balance columns (arrays)": sum(getsizeof(c) for c in columns),
            "further currencies dict": getsizeof(self._more)
            + sum(getsizeof(k) + getsizeof(v) for k, v in self._more.items()),
        }
        out["total"] = sum(out.values())
        return out

    # -- loading ---------------------------------------------------------------------------
    def load_account(self, account_id: str, account_type: AccountType, no_negative: bool) -> None:
        """Register an account read from the store."""
        # tuple.index finds the member by identity in C; hashing an enum member runs Python code.
        kind = TYPES.index(account_type) | (NO_NEGATIVE if no_negative else 0)
        row = self._rows.get(account_id)
        if row is None:  # the common case when loading: append the row directly
            self._rows[account_id] = len(self._kind)
            self._kind.append(kind)
            self._slot0.append(-1)
            self._cur0.append(0)
            self._account_count += 1
            return
        if self._kind[row] == NO_ACCOUNT:
            self._account_count += 1
        self._kind[row] = kind

    def load_balance(self, key: BalanceKey, vector: Iterable[int]) -> None:
        """Register a balance read from the store: posted/pending debits and credits."""
        values = tuple(vector)
        if len(values) != 4 or min(values) < 0:
            check(False, f"bad stored balance for {key}: {list(values)}")
        row = self._rows.get(key[0])
        code = self._currency_code.get(key[1])
        if row is not None and code is not None and self._slot0[row] < 0:
            # The common case when loading: the account's first balance, appended directly.
            self._slot0[row], self._cur0[row] = len(self._dp), code
            self._dp.append(values[0])
            self._cp.append(values[1])
            self._dpend.append(values[2])
            self._cpend.append(values[3])
            return
        slot = self._slot(key)
        if slot < 0:
            slot = self._new_slot(key)
        self._dp[slot], self._cp[slot], self._dpend[slot], self._cpend[slot] = values

    def forget(self, account_ids: Iterable[str]) -> int:
        """Drop accounts another shard now owns (resharding): unregistered, balances zeroed.

        Their rows stay (rows are never removed) but hold nothing, exactly as if the book had
        never loaded them; loading them again later (the slot comes back) overwrites them.
        None may be reserved: the handoff drains reservations first. Returns how many were known.
        """
        rows = {self._rows[a] for a in account_ids if a in self._rows}
        reserved = [key for key in self.reserved if self._rows.get(key[0]) in rows]
        check(not reserved, f"forgetting accounts with reservations: {reserved[:3]}")
        slots = [self._slot0[row] for row in rows if self._slot0[row] >= 0]
        slots += [slot for packed, slot in self._more.items() if packed >> CURRENCY_SHIFT in rows]
        for slot in slots:
            self._dp[slot] = self._cp[slot] = self._dpend[slot] = self._cpend[slot] = 0
        known = 0
        for row in rows:
            if self._kind[row] != NO_ACCOUNT:
                self._kind[row] = NO_ACCOUNT
                known += 1
        self._account_count -= known
        check(self._account_count >= 0, "account count went negative")
        return known

    # -- reads -----------------------------------------------------------------------------
    def account(self, account_id: str) -> AccountInfo | None:
        """Type and policy of a registered account, or None."""
        row = self._rows.get(account_id)
        if row is None or self._kind[row] == NO_ACCOUNT:
            return None
        kind = self._kind[row]
        return AccountInfo(TYPES[kind & TYPE_MASK], bool(kind & NO_NEGATIVE))

    def balance(self, key: BalanceKey) -> list[int]:
        """Posted and pending debits/credits (zeros for an unknown key)."""
        slot = self._slot(key)
        return self._vector(slot) if slot >= 0 else [0, 0, 0, 0]

    def available(self, key: BalanceKey, staging: Staging | None = None, exclude: str | None = None) -> int:
        """Normal-side balance minus pending and reserved amounts that would reduce it."""
        row = self._rows.get(key[0])
        if row is None or self._kind[row] == NO_ACCOUNT:  # not created yet: nothing posted, no policy
            return 0
        account_type = TYPES[self._kind[row] & TYPE_MASK]
        vector = self.balance(key)
        debits, credits = vector[DP], vector[CP]
        if staging is not None and key in staging.deltas:
            debits += staging.deltas[key][0]
            credits += staging.deltas[key][1]
        reserved: Iterable[int] = self.reserved.get(key, (0, 0))
        if exclude is not None:
            reserved = self._without(key, reserved, exclude)
        held = list(reserved)
        if staging is not None and staging.pending:
            extra = staging.pending.get(key)
            if extra is not None:
                held = [held[0] + extra[0], held[1] + extra[1]]
        reducing = vector[CPEND] + held[1] if account_type.debit_normal else vector[DPEND] + held[0]
        return normal_balance(account_type, debits, credits) - reducing

    def _without(self, key: BalanceKey, reserved: Iterable[int], txid: str) -> list[int]:
        totals = list(reserved)
        for line in self.reservations.get(txid, ()):
            if (line.account_id, line.currency) == key:
                totals[0 if line.is_debit else 1] -= line.amount
        return totals

    # -- checks ----------------------------------------------------------------------------
    def _ensure_accounts(self, lines: Iterable[Line], staging: Staging) -> None:
        """Stage the accounts of `lines` that are not registered yet (created on first use)."""
        rows, kinds, new = self._rows, self._kind, staging.new_accounts  # `accounts`, without the view
        for line in lines:
            row = rows.get(line.account_id)
            if (row is None or kinds[row] == NO_ACCOUNT) and line.account_id not in new:
                new[line.account_id] = line.account_type

    def shortfall(
        self, lines: tuple[Line, ...], staging: Staging | None = None, exclude: str | None = None
    ) -> Rejection | None:
        """INSUFFICIENT_FUNDS if these lines would take a guarded balance below zero."""
        net: dict[BalanceKey, int] = {}
        for line in lines:
            row = self._rows.get(line.account_id)
            if row is None:
                continue
            kind = self._kind[row]
            if kind == NO_ACCOUNT or not kind & NO_NEGATIVE:
                continue
            grows = line.is_debit == DEBIT_NORMAL[kind & TYPE_MASK]
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
        """Check these lines against the book plus the staging; add them if they pass.

        The same as `shortfall`, then `_ensure_accounts`, then `Staging.add` per line, in one pass
        over the lines for the common case (no guarded account among them): a shard stages every
        journal of its group commit through here.
        """
        rows, kinds = self._rows, self._kind
        unknown = guarded = False
        for line in lines:
            row = rows.get(line.account_id)
            if row is None or kinds[row] == NO_ACCOUNT:
                unknown = True
            elif kinds[row] & NO_NEGATIVE:
                guarded = True
        if guarded:
            rejection = self.shortfall(lines, staging)
            if rejection is not None:
                return rejection
        if unknown:
            self._ensure_accounts(lines, staging)
        deltas = staging.deltas
        for line in lines:
            key = (line.account_id, line.currency)
            delta = deltas.get(key)
            if delta is None:
                delta = deltas[key] = [0, 0]
            delta[0 if line.side == "debit" else 1] += line.amount
        return None

    def apply(self, staging: Staging) -> None:
        """Merge a durable staging into the book."""
        for account_id, account_type in staging.new_accounts.items():
            if account_id not in self.accounts:
                self.load_account(account_id, account_type, False)
        for key, (debits, credits) in staging.deltas.items():
            slot = self._slot(key)
            if slot < 0:
                slot = self._new_slot(key)
            posted_debits, posted_credits = self._dp[slot] + debits, self._cp[slot] + credits
            check(posted_debits >= 0 and posted_credits >= 0, "negative posted totals for %s", key)
            check(max(posted_debits, posted_credits) <= INT64_MAX, "posted totals overflow for %s", key)
            self._dp[slot], self._cp[slot] = posted_debits, posted_credits
        for key, (debits, credits) in staging.pending.items():
            slot = self._slot(key)
            if slot < 0:
                slot = self._new_slot(key)
            pending_debits, pending_credits = self._dpend[slot] + debits, self._cpend[slot] + credits
            check(pending_debits >= 0 and pending_credits >= 0, "negative pending totals for %s", key)
            check(max(pending_debits, pending_credits) <= INT64_MAX, "pending totals overflow for %s", key)
            self._dpend[slot], self._cpend[slot] = pending_debits, pending_credits
        for txid in staging.released:
            self.release(txid)

    # -- holds (pending amounts) ---------------------------------------------------------------
    def hold(self, lines: tuple[Line, ...], staging: Staging) -> Rejection | None:
        """Check a hold's lines like a posting; stage them as pending if they pass."""
        rejection = self.shortfall(lines, staging)
        if rejection is not None:
            return rejection
        self._ensure_accounts(lines, staging)
        for line in lines:
            staging.add_pending(line, 1)
        return None

    def stage_hold_post(self, held: tuple[Line, ...], posted: tuple[Line, ...], staging: Staging) -> None:
        """Release a hold's pending amounts and stage the posted ones (each at most the held line)."""
        check(len(held) == len(posted), "a posted hold has one line per held line")
        for was, now in zip(held, posted, strict=True):
            check(
                (was.account_id, was.currency, was.side) == (now.account_id, now.currency, now.side)
                and 0 < now.amount <= was.amount,
                f"posted line {now.line_no} exceeds or differs from its held line",
            )
            staging.add_pending(was, -1)
            staging.add(now)

    def stage_hold_release(self, held: tuple[Line, ...], staging: Staging) -> None:
        """Release a hold's pending amounts (void or expiry)."""
        for line in held:
            staging.add_pending(line, -1)

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
            check(min(totals) >= 0, "reservation totals went negative for %s", key)
            if totals == [0, 0]:
                del self.reserved[key]
        return True

    def stage_reserved(self, txid: str, lines: tuple[Line, ...], staging: Staging) -> None:
        """Stage a committed part without a check (it was checked at prepare and is reserved)."""
        self._ensure_accounts(lines, staging)
        for line in lines:
            staging.add(line)
        staging.released.append(txid)
