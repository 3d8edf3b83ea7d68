"""Unit tests of the shard book (`ledger.book`): overdraft guard, staging, reservations."""

from __future__ import annotations

from ledger.accounts import AccountType, account_type_of
from ledger.book import Book, Staging
from ledger.errors import ErrorCode
from ledger.journal import Line

USD = "USD"


def _line(no: int, account: str, side: str, amount: int, currency: str = USD) -> Line:
    account_type = account_type_of(account)
    assert account_type is not None
    return Line(no, account, account_type, side, amount, currency, {})  # type: ignore[arg-type]


def _move(debit: str, credit: str, amount: int, currency: str = USD) -> tuple[Line, ...]:
    """A balanced two-line journal: debit one account, credit the other."""
    return (_line(0, debit, "debit", amount, currency), _line(1, credit, "credit", amount, currency))


def _post(book: Book, lines: tuple[Line, ...]) -> None:
    staging = Staging()
    assert book.stage(lines, staging) is None
    book.apply(staging)


def _book_with_customer(balance: int) -> Book:
    """A book with a guarded customer liability holding `balance` (credited from cash)."""
    book = Book()
    book.load_account("liability:cust", AccountType.LIABILITY, True)
    book.load_account("asset:cash", AccountType.ASSET, False)
    if balance:
        _post(book, _move("asset:cash", "liability:cust", balance))
    return book


def test_guarded_liability_refuses_debit_beyond_its_credits() -> None:
    """A no_negative liability may be debited down to zero but not below."""
    book = _book_with_customer(100)
    staging = Staging()
    rejection = book.stage(_move("liability:cust", "asset:cash", 101), staging)
    assert rejection is not None
    assert rejection.code == ErrorCode.INSUFFICIENT_FUNDS
    assert rejection.details == {
        "account_id": "liability:cust",
        "currency": USD,
        "available": 100,
        "requested": 101,
    }
    assert staging.deltas == {}
    assert book.stage(_move("liability:cust", "asset:cash", 100), staging) is None
    book.apply(staging)
    assert book.balance(("liability:cust", USD)) == [100, 100, 0, 0]
    assert book.available(("liability:cust", USD)) == 0


def test_guarded_asset_refuses_credit_beyond_its_debits() -> None:
    """A no_negative asset may be credited down to zero but not below."""
    book = Book()
    book.load_account("asset:wallet", AccountType.ASSET, True)
    _post(book, _move("asset:wallet", "equity:capital", 50))
    assert book.available(("asset:wallet", USD)) == 50
    rejection = book.stage(_move("expense:x", "asset:wallet", 51), Staging())
    assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS
    assert rejection.details["available"] == 50
    _post(book, _move("expense:x", "asset:wallet", 50))
    assert book.balance(("asset:wallet", USD))[:2] == [50, 50]


def test_guard_is_per_currency() -> None:
    """Money in one currency does not cover a debit in another."""
    book = _book_with_customer(100)
    rejection = book.stage(_move("liability:cust", "asset:cash", 1, "EUR"), Staging())
    assert rejection is not None and rejection.details["currency"] == "EUR"


def test_unguarded_accounts_may_go_negative() -> None:
    """Without no_negative (and for accounts created on first use) balances may go below zero."""
    book = Book()
    book.load_account("liability:open", AccountType.LIABILITY, False)
    _post(book, _move("liability:open", "asset:cash", 1_000))  # debit a liability with nothing in it
    _post(book, _move("expense:x", "asset:fresh", 5))  # credit a brand-new asset
    assert book.available(("liability:open", USD)) == -1_000
    assert book.available(("asset:fresh", USD)) == -5
    assert book.accounts["asset:fresh"].no_negative is False


def test_staging_is_checked_cumulatively() -> None:
    """Two debits that fit separately but not together: the second one of the batch is refused."""
    book = _book_with_customer(100)
    staging = Staging()
    assert book.stage(_move("liability:cust", "asset:cash", 60), staging) is None
    second = book.stage(_move("liability:cust", "asset:cash", 60), staging)
    assert second is not None and second.code == ErrorCode.INSUFFICIENT_FUNDS
    assert second.details["available"] == 40
    assert book.stage(_move("liability:cust", "asset:cash", 40), staging) is None
    book.apply(staging)
    assert book.balance(("liability:cust", USD))[:2] == [100, 100]


def test_credits_staged_earlier_in_the_batch_count() -> None:
    """Money credited earlier in the same batch may be spent later in it."""
    book = _book_with_customer(0)
    staging = Staging()
    assert book.stage(_move("asset:cash", "liability:cust", 30), staging) is None
    assert book.stage(_move("liability:cust", "asset:cash", 30), staging) is None


def test_dropped_staging_leaves_the_book_untouched() -> None:
    """Staging without apply (the batch failed) changes neither balances nor accounts."""
    book = _book_with_customer(100)
    before = ({k: list(v) for k, v in book.balances.items()}, dict(book.accounts))
    staging = Staging()
    assert book.stage(_move("liability:cust", "asset:cash", 70), staging) is None
    assert book.stage(_move("asset:new", "revenue:new", 5), staging) is None
    del staging
    assert ({k: list(v) for k, v in book.balances.items()}, dict(book.accounts)) == before
    assert book.available(("liability:cust", USD)) == 100
    assert book.stage(_move("liability:cust", "asset:cash", 100), Staging()) is None


def test_journal_netting_on_one_account_is_not_an_overdraft() -> None:
    """Debiting and crediting the same guarded account by the same amount needs no funds."""
    book = _book_with_customer(0)
    lines = (
        _line(0, "liability:cust", "debit", 10),
        _line(1, "liability:cust", "credit", 10),
    )
    assert book.stage(lines, Staging()) is None


def test_reservation_reduces_available_only_on_the_reducing_side() -> None:
    """A reserved debit of a liability lowers its available; a reserved credit does not raise it."""
    book = _book_with_customer(100)
    book.load_account("liability:other", AccountType.LIABILITY, True)
    key = ("liability:cust", USD)
    assert book.reserve("tx-out", _move("liability:cust", "asset:cash", 30)) is None
    assert book.available(key) == 70
    assert book.reserve("tx-in", _move("asset:cash", "liability:cust", 500)) is None
    assert book.available(key) == 70  # incoming money is not spendable before it commits
    assert book.balance(key) == [0, 100, 0, 0]  # reservations never touch posted balances
    rejection = book.stage(_move("liability:cust", "asset:cash", 71), Staging())
    assert rejection is not None and rejection.details["available"] == 70
    assert book.stage(_move("liability:cust", "asset:cash", 70), Staging()) is None
    assert book.reserved[key] == [30, 500]


def test_reserve_refuses_what_does_not_fit() -> None:
    """PREPARE of a part that would overdraw a guarded account votes INSUFFICIENT_FUNDS and holds nothing."""
    book = _book_with_customer(100)
    assert book.reserve("tx-1", _move("liability:cust", "asset:cash", 80)) is None
    rejection = book.reserve("tx-2", _move("liability:cust", "asset:cash", 21))
    assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS
    assert "tx-2" not in book.reservations
    assert book.available(("liability:cust", USD)) == 20


def test_reserve_is_idempotent() -> None:
    """A repeated PREPARE of the same txid does not reserve twice."""
    book = _book_with_customer(100)
    lines = _move("liability:cust", "asset:cash", 60)
    assert book.reserve("tx", lines) is None
    assert book.reserve("tx", lines) is None
    assert book.available(("liability:cust", USD)) == 40
    assert book.reserved[("liability:cust", USD)] == [60, 0]


def test_release_is_idempotent() -> None:
    """Releasing twice frees the funds once; releasing an unknown txid is a no-op."""
    book = _book_with_customer(100)
    assert book.reserve("tx", _move("liability:cust", "asset:cash", 60)) is None
    assert book.release("tx") is True
    assert book.release("tx") is False
    assert book.release("never") is False
    assert book.available(("liability:cust", USD)) == 100
    assert book.reserved == {}
    assert book.reservations == {}


def test_reloaded_reservation_that_no_longer_fits_is_kept() -> None:
    """A force-reloaded reservation re-prepared without room votes NO but keeps holding the funds."""
    book = _book_with_customer(100)
    lines = _move("liability:cust", "asset:cash", 150)
    assert book.reserve("tx", lines, force=True) is None  # recovery reload skips the check
    assert book.available(("liability:cust", USD)) == -50
    rejection = book.reserve("tx", lines)  # the coordinator re-sends PREPARE
    assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS
    assert rejection.details["available"] == 100  # judged without its own reservation
    assert book.reservations["tx"] == lines  # kept: a COMMIT may still arrive
    assert book.reserved[("liability:cust", USD)] == [150, 0]
    assert book.available(("liability:cust", USD)) == -50


def test_reloaded_reservation_that_fits_votes_yes_once() -> None:
    """A reloaded reservation re-prepared with room votes YES and is still held once."""
    book = _book_with_customer(100)
    lines = _move("liability:cust", "asset:cash", 60)
    assert book.reserve("tx", lines, force=True) is None
    assert book.reserve("tx", lines) is None
    assert book.available(("liability:cust", USD)) == 40


def test_stage_reserved_and_apply_posts_and_releases() -> None:
    """A committed part is posted and its reservation dropped in the same apply."""
    book = _book_with_customer(100)
    lines = _move("liability:cust", "asset:cash", 60)
    assert book.reserve("tx", lines) is None
    staging = Staging()
    book.stage_reserved("tx", lines, staging)
    assert "tx" in book.reservations  # still held until the batch is durable
    book.apply(staging)
    assert "tx" not in book.reservations
    assert book.reserved == {}
    assert book.balance(("liability:cust", USD)) == [60, 100, 0, 0]
    assert book.available(("liability:cust", USD)) == 40


def test_stage_reserved_dropped_keeps_the_reservation() -> None:
    """If the commit batch fails, the part stays reserved and nothing is posted."""
    book = _book_with_customer(100)
    lines = _move("liability:cust", "asset:cash", 60)
    assert book.reserve("tx", lines) is None
    book.stage_reserved("tx", lines, Staging())
    assert book.reservations["tx"] == lines
    assert book.balance(("liability:cust", USD)) == [0, 100, 0, 0]
    assert book.available(("liability:cust", USD)) == 40


def test_refused_journal_stages_neither_its_new_accounts_nor_its_amounts() -> None:
    """`stage` checks a guarded line before it stages anything. Tried: a guarded debit beyond the
    balance beside a line on an account the book does not know, in both line orders -> refused,
    nothing staged (no new account, no delta); the same journal within the balance -> the new
    account and both deltas staged."""
    for guarded_first in (True, False):
        book = _book_with_customer(100)
        staging = Staging()
        lines = _move("liability:cust", "asset:new", 101)
        if not guarded_first:
            lines = (lines[1], lines[0])
        rejection = book.stage(lines, staging)
        assert rejection is not None and rejection.code == ErrorCode.INSUFFICIENT_FUNDS
        assert staging.new_accounts == {} and staging.deltas == {}
        assert book.stage(_move("liability:cust", "asset:new", 100), staging) is None
        assert staging.new_accounts == {"asset:new": AccountType.ASSET}
        assert staging.deltas == {("liability:cust", USD): [100, 0], ("asset:new", USD): [0, 100]}


def test_stage_equals_the_three_steps_it_fuses() -> None:
    """`stage` against `shortfall` + `_ensure_accounts` + `Staging.add`, journal by journal over a
    seeded mix of guarded, unguarded and unknown accounts in two currencies (some refused): the
    same answers and the same staging."""
    import random

    rng = random.Random(7)
    accounts = [
        "liability:g1",
        "asset:g2",
        "asset:u1",
        "liability:u2",
        "asset:n1",
        "expense:n2",
        "revenue:n3",
    ]
    fused, steps = Book(), Book()
    for book in (fused, steps):
        book.load_account("liability:g1", AccountType.LIABILITY, True)
        book.load_account("asset:g2", AccountType.ASSET, True)
        book.load_account("asset:u1", AccountType.ASSET, False)
        book.load_account("liability:u2", AccountType.LIABILITY, False)
    staged_fused, staged_steps = Staging(), Staging()
    refused = 0
    for _ in range(400):
        debit, credit = rng.sample(accounts, 2)
        lines = _move(debit, credit, rng.randint(1, 50), rng.choice([USD, "EUR"]))
        answer = fused.stage(lines, staged_fused)
        expected = steps.shortfall(lines, staged_steps)
        if expected is None:
            steps._ensure_accounts(lines, staged_steps)
            for line in lines:
                staged_steps.add(line)
        assert (answer is None) == (expected is None)
        assert answer is None or answer.details == expected.details  # type: ignore[union-attr]
        refused += answer is not None
        if rng.random() < 0.1:
            fused.apply(staged_fused)
            steps.apply(staged_steps)
            staged_fused, staged_steps = Staging(), Staging()
        assert staged_fused.deltas == staged_steps.deltas
        assert staged_fused.new_accounts == staged_steps.new_accounts
    assert 0 < refused < 400  # both roads taken
