"""Stateful property test: `ledger.book.Book` against a simple dict model."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ledger.accounts import AccountType, account_type_of, normal_balance
from ledger.book import Book, Staging
from ledger.errors import ErrorCode
from ledger.journal import Line

GUARDED = ["liability:g1", "asset:g2"]
OPEN = ["asset:cash", "equity:cap", "liability:u1", "expense:e1"]
ACCOUNTS = GUARDED + OPEN
CURRENCIES = ["USD", "EUR"]
TXIDS = [f"tx{i}" for i in range(5)]
HOLDS = [f"hold{i}" for i in range(5)]

Key = tuple[str, str]


@st.composite
def moves(draw: st.DrawFn) -> tuple[Line, ...]:
    """A balanced 2-line journal between two different accounts."""
    debit = draw(st.sampled_from(ACCOUNTS))
    credit = draw(st.sampled_from([a for a in ACCOUNTS if a != debit]))
    amount = draw(st.integers(min_value=1, max_value=200))
    currency = draw(st.sampled_from(CURRENCIES))
    return (_line(0, debit, "debit", amount, currency), _line(1, credit, "credit", amount, currency))


def _line(no: int, account: str, side: str, amount: int, currency: str) -> Line:
    account_type = account_type_of(account)
    assert account_type is not None
    return Line(no, account, account_type, side, amount, currency, {})  # type: ignore[arg-type]


def _reduces(line: Line) -> bool:
    """True if the line lowers its account's normal-side balance."""
    return line.is_debit != line.account_type.debit_normal


class BookMachine(RuleBasedStateMachine):
    """Random postings, dropped batches and cross-shard reservations, mirrored in dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.book = Book()
        for account in GUARDED:
            account_type = account_type_of(account)
            assert account_type is not None
            self.book.load_account(account, account_type, True)
        self.posted: dict[Key, list[int]] = {}
        self.reservations: dict[str, tuple[Line, ...]] = {}
        self.holds: dict[str, tuple[Line, ...]] = {}  # open holds
        self.closed: dict[str, str] = {}  # hold id -> "posted" | "voided" (never both)

    # -- the model ---------------------------------------------------------------------------
    def _normal(self, key: Key, extra: dict[Key, list[int]]) -> int:
        debits, credits = self.posted.get(key, [0, 0])
        more = extra.get(key, [0, 0])
        account_type = account_type_of(key[0])
        assert account_type is not None
        return normal_balance(account_type, debits + more[0], credits + more[1])

    def _reserved_reducing(self, key: Key, exclude: str | None = None) -> int:
        held = [lines for txid, lines in self.reservations.items() if txid != exclude]
        held.extend(self.holds.values())  # pending amounts of open holds count like reservations
        return sum(
            line.amount
            for lines in held
            for line in lines
            if (line.account_id, line.currency) == key and _reduces(line)
        )

    def _fits(
        self, lines: tuple[Line, ...], staged: dict[Key, list[int]], exclude: str | None = None
    ) -> bool:
        for line in lines:
            key = (line.account_id, line.currency)
            if line.account_id in GUARDED and _reduces(line):
                available = self._normal(key, staged) - self._reserved_reducing(key, exclude)
                if available < line.amount:
                    return False
        return True

    @staticmethod
    def _add(target: dict[Key, list[int]], lines: tuple[Line, ...]) -> None:
        for line in lines:
            pair = target.setdefault((line.account_id, line.currency), [0, 0])
            pair[0 if line.is_debit else 1] += line.amount

    def _snapshot(self) -> tuple[dict[Key, list[int]], dict[Key, list[int]], set[str]]:
        return (
            {k: list(v) for k, v in self.book.balances.items()},
            {k: list(v) for k, v in self.book.reserved.items()},
            set(self.book.accounts),
        )

    def _stage_all(self, journals: list[tuple[Line, ...]]) -> tuple[Staging, dict[Key, list[int]]]:
        staging = Staging()
        staged: dict[Key, list[int]] = {}
        for lines in journals:
            expected_ok = self._fits(lines, staged)
            rejection = self.book.stage(lines, staging)
            if expected_ok:
                assert rejection is None, rejection.message
                self._add(staged, lines)
            else:
                assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS
        return staging, staged

    # -- rules -------------------------------------------------------------------------------
    @rule(journals=st.lists(moves(), min_size=1, max_size=4))
    def post_batch(self, journals: list[tuple[Line, ...]]) -> None:
        """Stage a batch of journals (checked cumulatively) and apply it."""
        staging, staged = self._stage_all(journals)
        self.book.apply(staging)
        for key, (debits, credits) in staged.items():
            pair = self.posted.setdefault(key, [0, 0])
            pair[0] += debits
            pair[1] += credits

    @rule(journals=st.lists(moves(), min_size=1, max_size=4))
    def stage_and_drop(self, journals: list[tuple[Line, ...]]) -> None:
        """A batch whose commit failed leaves the book exactly as it was."""
        before = self._snapshot()
        self._stage_all(journals)
        assert self._snapshot() == before

    @rule(txid=st.sampled_from(TXIDS), lines=moves())
    def prepare(self, txid: str, lines: tuple[Line, ...]) -> None:
        """Reserve a new part, or re-prepare a held one (which keeps it whatever the vote)."""
        if txid in self.reservations:
            held = self.reservations[txid]
            expected_ok = self._fits(held, {}, exclude=txid)
            rejection = self.book.reserve(txid, held)
            assert self.book.reservations[txid] == held
        else:
            expected_ok = self._fits(lines, {})
            rejection = self.book.reserve(txid, lines)
            if expected_ok:
                self.reservations[txid] = lines
            else:
                assert txid not in self.book.reservations
        if expected_ok:
            assert rejection is None, rejection.message
        else:
            assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS

    @rule(txid=st.sampled_from(TXIDS))
    def abort(self, txid: str) -> None:
        """Release a part (idempotent)."""
        assert self.book.release(txid) is (self.reservations.pop(txid, None) is not None)

    @rule(txid=st.sampled_from(TXIDS), before=st.lists(moves(), max_size=2))
    def commit(self, txid: str, before: list[tuple[Line, ...]]) -> None:
        """Commit a held part in a batch after some postings: posted and released on apply."""
        lines = self.reservations.get(txid)
        if lines is None:
            return
        staging, staged = self._stage_all(before)
        self.book.stage_reserved(txid, lines, staging)
        self.book.apply(staging)
        del self.reservations[txid]
        self._add(staged, lines)
        for key, (debits, credits) in staged.items():
            pair = self.posted.setdefault(key, [0, 0])
            pair[0] += debits
            pair[1] += credits

    @rule(hold_id=st.sampled_from(HOLDS), lines=moves())
    def create_hold(self, hold_id: str, lines: tuple[Line, ...]) -> None:
        """A hold is checked like a posting and, if it fits, becomes pending (a new id only)."""
        if hold_id in self.holds or hold_id in self.closed:
            return
        expected_ok = self._fits(lines, {})
        staging = Staging()
        rejection = self.book.hold(lines, staging)
        if not expected_ok:
            assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS
            return
        assert rejection is None, rejection.message
        self.book.apply(staging)
        self.holds[hold_id] = lines

    @rule(hold_id=st.sampled_from(HOLDS), share=st.integers(min_value=1, max_value=100))
    def post_hold(self, hold_id: str, share: int) -> None:
        """Post an open hold with `share`% of its amount (at least 1): posted, the rest released."""
        held = self.holds.get(hold_id)
        if held is None:
            return
        amount = max(1, held[0].amount * share // 100)
        posted = tuple(_line(x.line_no, x.account_id, x.side, amount, x.currency) for x in held)
        staging = Staging()
        self.book.stage_hold_post(held, posted, staging)
        self.book.apply(staging)
        del self.holds[hold_id]
        self.closed[hold_id] = "posted"
        staged: dict[Key, list[int]] = {}
        self._add(staged, posted)
        for key, (debits, credits) in staged.items():
            pair = self.posted.setdefault(key, [0, 0])
            pair[0] += debits
            pair[1] += credits

    @rule(hold_id=st.sampled_from(HOLDS))
    def void_hold(self, hold_id: str) -> None:
        """Void (or expire) an open hold: its pending amounts are released, nothing posted."""
        held = self.holds.get(hold_id)
        if held is None:
            return
        staging = Staging()
        self.book.stage_hold_release(held, staging)
        self.book.apply(staging)
        del self.holds[hold_id]
        self.closed[hold_id] = "voided"

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def posted_balances_match_the_model(self) -> None:
        """The book's posted debits/credits equal the model's; pending = the open holds' lines."""
        assert {k: v[:2] for k, v in self.book.balances.items() if v[:2] != [0, 0]} == {
            k: v for k, v in self.posted.items() if v != [0, 0]
        }
        pending: dict[Key, list[int]] = {}
        self._add(pending, tuple(line for lines in self.holds.values() for line in lines))
        assert {k: v[2:] for k, v in self.book.balances.items() if v[2:] != [0, 0]} == pending

    @invariant()
    def a_hold_is_open_or_closed_once(self) -> None:
        """A hold id is open or closed (posted or voided), never both."""
        assert not set(self.holds) & set(self.closed)

    @invariant()
    def guarded_accounts_never_below_zero(self) -> None:
        """Posted normal-side balance minus reserved reductions is never negative for guarded accounts."""
        for account in GUARDED:
            for currency in CURRENCIES:
                key = (account, currency)
                assert self._normal(key, {}) - self._reserved_reducing(key) >= 0
                assert self.book.available(key) >= 0

    @invariant()
    def zero_sum_per_currency(self) -> None:
        """Over all accounts, debits minus credits is zero in every currency."""
        for currency in CURRENCIES:
            assert sum(d - c for (_, cur), (d, c, *_) in self.book.balances.items() if cur == currency) == 0

    @invariant()
    def reserved_totals_equal_live_reservations(self) -> None:
        """`reserved` is exactly the sum of the held reservations, which match the model's."""
        assert self.book.reservations == self.reservations
        totals: dict[Key, list[int]] = {}
        self._add(totals, tuple(line for lines in self.reservations.values() for line in lines))
        assert self.book.reserved == totals

    @invariant()
    def accounts_keep_their_policy(self) -> None:
        """Guarded accounts stay guarded; accounts created on first use are unguarded and typed."""
        for account, info in self.book.accounts.items():
            assert info.no_negative is (account in GUARDED)
            assert info.account_type == AccountType(account.split(":", 1)[0])


BookMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_book_model = BookMachine.TestCase
