"""Property tests: a journal validates iff it has 2..256 lines and balances in every currency."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.errors import ErrorCode, Rejection
from ledger.journal import JournalIn, LineIn, balance_by_currency, validate_journal

ACCOUNTS = ["asset:cash", "asset:bank", "liability:cust:1", "equity:capital", "revenue:sales", "expense:fees"]
CURRENCIES = ["USD", "EUR", "JPY"]
AMOUNTS = st.integers(min_value=1, max_value=10**12)

line_strategy = st.builds(
    LineIn,
    account_id=st.sampled_from(ACCOUNTS),
    side=st.sampled_from(["debit", "credit"]),
    amount_cents=AMOUNTS,
    currency=st.sampled_from(CURRENCIES),
)


def _net(lines: list[LineIn]) -> dict[str, int]:
    net: dict[str, int] = {}
    for line in lines:
        net[line.currency] = net.get(line.currency, 0) + (
            line.amount_cents if line.side == "debit" else -line.amount_cents
        )
    return net


@st.composite
def balanced_lines(draw: st.DrawFn, max_size: int = 40) -> list[LineIn]:
    """Random lines, then one offsetting line per unbalanced currency, shuffled."""
    lines = draw(st.lists(line_strategy, min_size=1, max_size=max_size))
    for currency, net in sorted(_net(lines).items()):
        if net:
            side = "credit" if net > 0 else "debit"
            lines.append(LineIn(draw(st.sampled_from(ACCOUNTS)), side, abs(net), currency))
    return draw(st.permutations(lines))


any_lines = st.one_of(
    st.lists(line_strategy, max_size=12),
    balanced_lines(),
    # around the 256-line bound
    st.integers(min_value=126, max_value=130).map(
        lambda pairs: [
            LineIn(ACCOUNTS[i % len(ACCOUNTS)], side, 5 + i, "USD")
            for i in range(pairs)
            for side in ("debit", "credit")
        ]
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_lines)
def test_validates_iff_line_count_ok_and_every_currency_balances(lines: list[LineIn]) -> None:
    """Accepted exactly when 2..256 lines and zero net per currency; else the right code and details."""
    net = _net(lines)
    count_ok = 2 <= len(lines) <= 256
    unbalanced = sorted(currency for currency, value in net.items() if value)
    try:
        journal = validate_journal(JournalIn(entries=lines))
    except Rejection as rejection:
        if not count_ok:
            assert rejection.code == ErrorCode.VALIDATION_ERROR
            assert rejection.details["field"] == "$.entries"
        else:
            assert unbalanced, f"balanced journal rejected: {rejection.message}"
            assert rejection.code == ErrorCode.LEDGER_IMBALANCE
            currency = unbalanced[0]
            debits = sum(ln.amount_cents for ln in lines if ln.currency == currency and ln.side == "debit")
            credits = sum(ln.amount_cents for ln in lines if ln.currency == currency and ln.side == "credit")
            assert rejection.details == {"currency": currency, "debits": debits, "credits": credits}
        return
    assert count_ok and not unbalanced
    assert len(journal.lines) == len(lines)
    assert [ln.amount for ln in journal.lines] == [ln.amount_cents for ln in lines]


@settings(max_examples=300, deadline=None)
@given(balanced_lines(max_size=60))
def test_balance_by_currency_of_a_validated_journal_is_zero(lines: list[LineIn]) -> None:
    """Every validated journal nets to zero in each of its currencies."""
    journal = validate_journal(JournalIn(entries=lines))
    net = balance_by_currency(journal.lines)
    assert set(net) == {ln.currency for ln in lines}
    assert all(value == 0 for value in net.values())
