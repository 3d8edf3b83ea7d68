"""Royalty rules and the accrual split (finance/royalties.py): validation, versions, rounding, lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from finance import invoices, royalties
from finance.invoices import Buyer, LineItem
from finance.royalties import Accrual, Rule, RuleRequest, Split, SplitIn, Terms
from ledger.errors import Rejection

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _request(**changes: object) -> RuleRequest:
    base = RuleRequest(
        sku="sku-a",
        effective_from="2026-01-01T00:00:00Z",
        splits=[SplitIn("alice", 3333), SplitIn("bob", 3333), SplitIn("carol", 1334)],
        platform_fee_bp=2000,
    )
    return msgspec.structs.replace(base, **changes)


KNOWN = {"alice", "bob", "carol"}


def _field(request: RuleRequest) -> str:
    with pytest.raises(Rejection) as caught:
        royalties.validate(request, KNOWN)
    assert caught.value.code == "VALIDATION_ERROR"
    return str(caught.value.details["field"])


def test_a_valid_rule_keeps_its_terms() -> None:
    terms = royalties.validate(_request(holdback_bp=1000, holdback_days=30), KNOWN)
    assert (terms.subject, terms.key, terms.effective_from) == ("sku", "sku-a", T0)
    assert terms.splits == (Split("alice", 3333), Split("bob", 3333), Split("carol", 1334))
    assert (terms.platform_fee_bp, terms.holdback_bp, terms.holdback_days) == (2000, 1000, 30)
    contract = royalties.validate(_request(sku=None, contract="deal-1"), KNOWN)
    assert (contract.subject, contract.key) == ("contract", "deal-1")


def test_bad_rules_name_their_field() -> None:
    assert _field(_request(platform_fee_bp=1999)) == "$.splits"
    assert _field(_request(platform_fee_bp=10001)) == "$.platform_fee_bp"
    assert _field(_request(splits=[SplitIn("alice", -1), SplitIn("bob", 8001)])) == "$.splits[0].share_bp"
    assert (
        _field(_request(splits=[SplitIn("alice", 4000), SplitIn("dave", 4000)]))
        == "$.splits[1].participant_id"
    )
    assert (
        _field(_request(splits=[SplitIn("alice", 4000), SplitIn("alice", 4000)]))
        == "$.splits[1].participant_id"
    )
    assert _field(_request(splits=[])) == "$.splits"
    assert _field(_request(sku=None)) == "$.sku"
    assert _field(_request(contract="c")) == "$.sku"
    assert _field(_request(sku=None, contract="a b")) == "$.contract"
    assert _field(_request(effective_from="2026-01-01")) == "$.effective_from"
    assert _field(_request(holdback_bp=10001, holdback_days=1)) == "$.holdback_bp"
    assert _field(_request(holdback_bp=1)) == "$.holdback_days"
    assert _field(_request(holdback_days=-1)) == "$.holdback_days"
    both = _request(holdback_bp=1, holdback_days=1, holdback_release_at="2026-02-01T00:00:00Z")
    assert _field(both) == "$.holdback_release_at"


def test_the_version_in_force_is_the_latest_effective_from_then_the_higher_version() -> None:
    terms = royalties.validate(_request(), KNOWN)

    def rule(version: int, days: int) -> Rule:
        return Rule(
            f"r{version}", version, msgspec.structs.replace(terms, effective_from=T0 + timedelta(days=days))
        )

    v1, v2, v3, v4 = rule(1, 0), rule(2, 10), rule(3, 5), rule(4, 10)
    versions = [v1, v2, v3, v4]
    assert royalties.in_force(versions, T0 - timedelta(seconds=1)) is None
    assert royalties.in_force(versions, T0) == v1
    assert royalties.in_force(versions, T0 + timedelta(days=7)) == v3  # backdated v3 beats v1
    assert royalties.in_force(versions, T0 + timedelta(days=10)) == v4  # same effective_from: higher


def test_split_gives_leftover_units_to_the_largest_fractions_then_by_participant_id() -> None:
    splits = [Split("alice", 3333), Split("bob", 3333), Split("carol", 1334)]
    assert royalties.split(1000, splits, 2000) == ([333, 333, 134], 200)
    # 1 unit, equal fractions: the lower participant id wins, whatever the rule order
    assert royalties.split(1, [Split("zed", 5000), Split("amy", 5000)], 0) == ([0, 1], 0)
    # the platform only gets a leftover unit after participants with the same fraction
    assert royalties.split(1, [Split("amy", 5000)], 5000) == ([1], 0)
    assert royalties.split(0, splits, 2000) == ([0, 0, 0], 0)
    assert royalties.split(7, [Split("a", 0)], 10000) == ([0], 7)


def test_accrual_lines_debit_royalty_expense_and_credit_payable_and_holdback() -> None:
    terms = royalties.validate(_request(holdback_bp=1000, holdback_days=30), KNOWN)
    accruals, fee = royalties.accrue(1000, terms)
    assert accruals == [Accrual("alice", 333, 33), Accrual("bob", 333, 33), Accrual("carol", 134, 13)]
    assert fee == 200 and [a.payable for a in accruals] == [300, 300, 121]
    lines = royalties.accrual_entries("sku-a", accruals, "EUR")
    assert [(e["account_id"], e["side"], e["amount_cents"]) for e in lines] == [
        ("expense:royalties:sku-a", "debit", 800),
        ("liability:royalty:alice", "credit", 300),
        ("liability:royalty-holdback:alice", "credit", 33),
        ("liability:royalty:bob", "credit", 300),
        ("liability:royalty-holdback:bob", "credit", 33),
        ("liability:royalty:carol", "credit", 121),
        ("liability:royalty-holdback:carol", "credit", 13),
    ]
    assert royalties.release_at(terms, T0) == T0 + timedelta(days=30)
    assert royalties.release_at(royalties.validate(_request(), KNOWN), T0) is None
    fixed = royalties.validate(_request(holdback_bp=1, holdback_release_at="2026-06-01T00:00:00Z"), KNOWN)
    assert royalties.release_at(fixed, T0) == datetime(2026, 6, 1, tzinfo=UTC)


def test_recognised_revenue_is_read_from_the_journal_and_contracts_from_the_lines() -> None:
    body = {
        "entries": [
            {"account_id": "liability:deferred-revenue:a", "side": "debit", "amount_cents": 5},
            {"account_id": "revenue:sales:a", "side": "credit", "amount_cents": 5},
            {"account_id": "revenue:sales:b", "side": "credit", "amount_cents": 7},
        ]
    }
    assert royalties.recognised_by_sku(body) == {"a": 5, "b": 7}
    buyer = Buyer("b-1", "DE")
    items = [LineItem("a", 1, 100, "standard", "deal"), LineItem("b", 1, 100, "standard")]
    invoice = invoices.create_invoice("inv-c", buyer, items, "EUR")
    assert royalties.contract_of(invoice.lines, "a") == "deal"
    assert royalties.contract_of(invoice.lines, "b") is None
    with pytest.raises(Rejection) as caught:
        invoices.create_invoice("inv-d", buyer, [items[0], LineItem("a", 1, 1, "standard")], "EUR")
    assert caught.value.details["field"] == "$.line_items[1].contract"


def test_a_line_without_contract_encodes_as_before() -> None:
    """Existing request digests and invoice documents do not change."""
    assert msgspec.json.encode(LineItem("a", 1, 100, "standard")) == (
        b'{"sku":"a","qty":1,"unit_price":100,"tax_code":"standard"}'
    )
    assert isinstance(Terms, type)


def test_clawback_reads_contra_debits_and_may_credit_back_a_rounding_unit() -> None:
    """Tried: a refund body with contra debits for two SKUs, one in another currency, and a
    deferred-revenue debit -> only the invoice currency's contra debits count; a clawback of a
    negative rounding unit credits the payable and debits the expense, still balanced."""
    body = {
        "entries": [
            {"account_id": "revenue:refunds:a", "side": "debit", "amount_cents": 300, "currency": "EUR"},
            {"account_id": "revenue:refunds:a", "side": "debit", "amount_cents": 20, "currency": "EUR"},
            {"account_id": "revenue:refunds:b", "side": "debit", "amount_cents": 50, "currency": "USD"},
            {
                "account_id": "liability:deferred-revenue:c",
                "side": "debit",
                "amount_cents": 9,
                "currency": "EUR",
            },
            {"account_id": "asset:cash:bank:EUR", "side": "credit", "amount_cents": 379, "currency": "EUR"},
        ]
    }
    assert royalties.reversed_by_sku(body, "EUR") == {"a": 320}
    entries = royalties.clawback_entries("a", {"p1": 5, "p2": -1}, "EUR")
    assert {(e["account_id"], e["side"], e["amount_cents"]) for e in entries} == {
        ("expense:royalties:a", "credit", 4),
        ("liability:royalty:p1", "debit", 5),
        ("liability:royalty:p2", "credit", 1),
    }
