"""Pure reconciliation matching (finance/reconcile.py): each reason, window attribution,
resolutions, provider record parsing and the CSV report; plus hypothesis properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finance import reconcile
from finance.reconcile import Record, Resolution, Window

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WINDOW = Window(T0, T0 + timedelta(days=1))


def rec(
    ref: str, amount: int = 1000, currency: str = "EUR", kind: str = "payment", hours: float = 1
) -> Record:
    return Record(kind, ref, amount, currency, T0 + timedelta(hours=hours), f"j-{ref}")  # type: ignore[arg-type]


def test_each_reason_is_found_once() -> None:
    """Tried: one record of each kind of trouble beside a matching one -> exactly those reasons,
    the matched count 1, ids d0001.. in key order, the absent side's amounts None."""
    ledger = [
        rec("pi_ok"),
        rec("pi_gone"),
        rec("pi_amt"),
        rec("pi_ccy"),
        rec("re_dup", kind="refund"),
        rec("re_dup", kind="refund"),
    ]
    provider = [
        rec("pi_ok"),
        rec("pi_new"),
        rec("pi_amt", 900),
        rec("pi_ccy", currency="USD"),
        rec("re_dup", kind="refund"),
    ]
    out = reconcile.reconcile(WINDOW, ledger, provider)
    reasons = {(d.kind, d.provider_reference): d.reason for d in out.discrepancies}
    assert reasons == {
        ("payment", "pi_gone"): "provider_missing",
        ("payment", "pi_new"): "ledger_missing",
        ("payment", "pi_amt"): "amount_mismatch",
        ("payment", "pi_ccy"): "currency_mismatch",
        ("refund", "re_dup"): "duplicate",
    }
    assert out.matched == 1
    assert [d.discrepancy_id for d in out.discrepancies] == ["d0001", "d0002", "d0003", "d0004", "d0005"]
    new = next(d for d in out.discrepancies if d.reason == "ledger_missing")
    assert (new.ledger_amount, new.journal_id, new.provider_amount) == (None, None, 1000)
    dup = next(d for d in out.discrepancies if d.reason == "duplicate")
    assert dup.details["side"] == "ledger" and dup.details["count"] == 2
    assert out.counts()["duplicate"] == 1 and sum(out.counts().values()) == 5


def test_a_key_belongs_to_the_window_of_its_provider_record() -> None:
    """Tried: provider record 1 s before the window end, ledger posting 2 s after it -> matched in
    this window; a ledger-only record after the end and a provider-only one before the start ->
    not reported here (their own windows report them)."""
    end = WINDOW.end
    provider = [
        Record("payment", "pi_edge", 10, "EUR", end - timedelta(seconds=1)),
        Record("payment", "pi_before", 10, "EUR", T0 - timedelta(seconds=1)),
    ]
    ledger = [
        Record("payment", "pi_edge", 10, "EUR", end + timedelta(seconds=2), "j1"),
        Record("payment", "pi_after", 10, "EUR", end + timedelta(seconds=2), "j2"),
    ]
    out = reconcile.reconcile(WINDOW, ledger, provider)
    assert (out.matched, out.discrepancies) == (1, [])


@pytest.mark.parametrize(
    ("ledger", "provider", "entries", "resolved"),
    [
        ([], [rec("pi_x")], {"EUR": 1000}, (1000, "EUR")),
        ([rec("pi_x")], [], {"EUR": 1000}, (None, None)),
        ([rec("pi_x")], [rec("pi_x", 900)], {"EUR": 100}, (900, "EUR")),
        ([rec("pi_x")], [rec("pi_x", currency="USD")], {"EUR": 1000, "USD": 1000}, (1000, "USD")),
        ([rec("pi_x"), rec("pi_x")], [rec("pi_x")], {"EUR": 1000}, (1000, "EUR")),
    ],
)
def test_a_resolution_brings_parity(
    ledger: list[Record],
    provider: list[Record],
    entries: dict[str, int],
    resolved: tuple[int | None, str | None],
) -> None:
    """Tried: each reason's discrepancy, a journal moving the expected amounts -> accepted, a
    journal of one unit more -> refused; the resolution recorded -> the rerun is parity."""
    (found,) = reconcile.reconcile(WINDOW, ledger, provider).discrepancies
    assert reconcile.adjustment_problem(found, entries) is None
    assert reconcile.adjustment_problem(found, {c: a + 1 for c, a in entries.items()}) is not None
    assert reconcile.resolved_value(found) == resolved
    resolution = Resolution("payment", "pi_x", "adj-1", T0 + timedelta(hours=2), *resolved)
    again = reconcile.reconcile(WINDOW, ledger, provider, [resolution])
    assert again.discrepancies == [] and again.matched == (0 if resolved[0] is None else 1)


def test_a_provider_duplicate_counts_once_after_resolution() -> None:
    """Tried: the provider lists pi_d twice -> duplicate on the provider side, any journal accepted;
    after a resolution -> matched."""
    (found,) = reconcile.reconcile(WINDOW, [rec("pi_d")], [rec("pi_d"), rec("pi_d")]).discrepancies
    assert (found.reason, found.details["side"]) == ("duplicate", "provider")
    assert reconcile.expected_adjustment(found) == {}
    amount, currency = reconcile.resolved_value(found)
    resolution = Resolution("payment", "pi_d", "adj", T0, amount, currency)
    assert reconcile.reconcile(WINDOW, [rec("pi_d")], [rec("pi_d"), rec("pi_d")], [resolution]).matched == 1


def test_provider_records_are_parsed_or_refused() -> None:
    """Tried: a succeeded intent (amount_received wins), a refund, a transfer -> records in upper-case
    currency; an intent still processing, a failed refund -> skipped; a string amount, no id, a bad
    currency, a float created -> ProviderDataError."""
    intent = {
        "id": "pi_1",
        "amount": 500,
        "amount_received": 450,
        "currency": "eur",
        "created": 1_700_000_000,
        "status": "succeeded",
    }
    assert reconcile.provider_record("payment", intent) == Record(
        "payment", "pi_1", 450, "EUR", datetime.fromtimestamp(1_700_000_000, UTC)
    )
    assert reconcile.provider_record("refund", {**intent, "id": "re_1", "status": "pending"}) is not None
    assert reconcile.provider_record("payout", {"id": "tr_1", "amount": 3, "currency": "usd", "created": 1})
    assert reconcile.provider_record("payment", {**intent, "status": "processing"}) is None
    assert reconcile.provider_record("refund", {**intent, "status": "failed"}) is None
    for broken in (
        {**intent, "amount_received": "450"},
        {k: v for k, v in intent.items() if k != "id"},
        {**intent, "currency": "euro"},
        {**intent, "created": 1.5},
    ):
        with pytest.raises(reconcile.ProviderDataError):
            reconcile.provider_record("payment", broken)


def test_csv_report_has_a_row_per_discrepancy() -> None:
    """Tried: two discrepancy rows -> header + 2 lines, absent values empty."""
    text = reconcile.report_csv(
        "reconcile-r1",
        [
            {
                "discrepancy_id": "d0001",
                "kind": "payment",
                "reason": "ledger_missing",
                "provider_reference": "pi_1",
                "journal_id": None,
                "ledger_amount": 0,
                "provider_amount": 10,
                "ledger_currency": None,
                "provider_currency": "EUR",
                "status": "open",
                "resolution_journal_id": None,
                "details": {},
            },
            {
                "discrepancy_id": "d0002",
                "kind": "refund",
                "reason": "provider_missing",
                "provider_reference": "re_1",
                "journal_id": "j",
                "ledger_amount": 5,
                "provider_amount": 0,
                "ledger_currency": "EUR",
                "provider_currency": None,
                "status": "resolved",
                "resolution_journal_id": "adj",
                "details": {},
            },
        ],
    )
    lines = text.splitlines()
    assert lines[0].split(",") == list(reconcile.CSV_COLUMNS)
    assert lines[1] == "reconcile-r1,d0001,payment,ledger_missing,pi_1,,0,10,,EUR,open,"
    assert len(lines) == 3


# -- properties ------------------------------------------------------------------------------------
records = st.lists(
    st.builds(
        rec,
        ref=st.text("abc123", min_size=1, max_size=4).map(lambda s: f"pi_{s}"),
        amount=st.integers(1, 10**9),
        currency=st.sampled_from(["EUR", "USD"]),
        kind=st.sampled_from(reconcile.KINDS),
        hours=st.floats(0, 23.9),
    ),
    max_size=30,
    unique_by=lambda r: (r.kind, r.reference),
)


@given(records)
def test_identical_sides_are_parity(side: list[Record]) -> None:
    """Tried: the same records on both sides -> every key matched, no discrepancy."""
    out = reconcile.reconcile(WINDOW, side, list(reversed(side)))
    assert (out.matched, out.discrepancies) == (len(side), [])


@given(records.filter(bool), st.data())
def test_one_change_gives_exactly_its_discrepancy(side: list[Record], data: st.DataObject) -> None:
    """Tried: both sides equal, then one record removed from one side, or its amount or currency
    changed, or duplicated -> exactly one discrepancy with that reason and reference, the others matched."""
    index = data.draw(st.integers(0, len(side) - 1))
    target = side[index]
    change = data.draw(st.sampled_from(["drop_provider", "drop_ledger", "amount", "currency", "duplicate"]))
    ledger, provider = list(side), list(side)
    if change == "drop_provider":
        provider.pop(index)
    elif change == "drop_ledger":
        ledger.pop(index)
    elif change == "amount":
        provider[index] = Record(target.kind, target.reference, target.amount + 1, target.currency, target.at)
    elif change == "currency":
        other = "USD" if target.currency == "EUR" else "EUR"
        provider[index] = Record(target.kind, target.reference, target.amount, other, target.at)
    else:
        provider.append(target)
    expected = {
        "drop_provider": "provider_missing",
        "drop_ledger": "ledger_missing",
        "amount": "amount_mismatch",
        "currency": "currency_mismatch",
        "duplicate": "duplicate",
    }[change]
    out = reconcile.reconcile(WINDOW, ledger, provider)
    assert [(d.reason, d.kind, d.provider_reference) for d in out.discrepancies] == [
        (expected, target.kind, target.reference)
    ]
    assert out.matched == len(side) - 1


def test_reconcile_every_accepts_seconds_and_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: LEDGER_RECONCILE_EVERY 90, 15m, 1h, 1d -> seconds; unset -> off (0); 'soon', '-1m' ->
    ConfigError naming the variable (the node refuses to start)."""
    from node.config import ConfigError, NodeConfig

    for text, seconds in (("90", 90.0), ("15m", 900.0), ("1h", 3600.0), ("1d", 86400.0)):
        monkeypatch.setenv("LEDGER_RECONCILE_EVERY", text)
        assert NodeConfig.from_env().reconcile_every_s == seconds
    monkeypatch.delenv("LEDGER_RECONCILE_EVERY")
    assert NodeConfig.from_env().reconcile_every_s == 0.0
    for bad in ("soon", "-1m"):
        monkeypatch.setenv("LEDGER_RECONCILE_EVERY", bad)
        with pytest.raises(ConfigError, match="LEDGER_RECONCILE_EVERY"):
            NodeConfig.from_env()
