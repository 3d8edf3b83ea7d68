"""The chart of accounts for marketplace finance: one builder per account family.

Every id follows the ledger grammar `type:rest` (`ledger.accounts`); the variable parts (buyer,
SKU, provider, payee, jurisdiction) are single segments of `[A-Za-z0-9._-]`, so an id never has
an ambiguous colon. `docs/accounting.md` explains what each account holds and which flows touch it.

| builder                     | id                                        | type      | normal side |
|-----------------------------|-------------------------------------------|-----------|-------------|
| `cash`                      | `asset:cash:{provider}:{CCY}`             | asset     | debit       |
| `receivable`                | `asset:ar:{buyer}`                        | asset     | debit       |
| `disputes_held`             | `asset:disputes-held:{provider}:{CCY}`    | asset     | debit       |
| `deferred_revenue`          | `liability:deferred-revenue:{sku}`        | liability | credit      |
| `tax_payable`               | `liability:tax-payable:{JURISDICTION}`    | liability | credit      |
| `customer_credit`           | `liability:customer-credit:{buyer}`       | liability | credit      |
| `royalties_payable`         | `liability:royalties-payable:{payee}`     | liability | credit      |
| `royalty_payable`           | `liability:royalty:{participant}`         | liability | credit      |
| `royalty_holdback`          | `liability:royalty-holdback:{participant}`| liability | credit      |
| `revenue`                   | `revenue:sales:{sku}`                     | revenue   | credit      |
| `platform_fees`             | `revenue:platform-fees:{sku}`             | revenue   | credit      |
| `refunds_contra`            | `revenue:refunds:{sku}` (contra revenue)  | revenue   | debit (contra) |
| `royalty_expense`           | `expense:royalties:{sku}`                 | expense   | debit       |
| `payment_fees`              | `expense:payment-fees:{provider}`         | expense   | debit       |
| `dispute_losses`            | `expense:dispute-losses:{provider}`       | expense   | debit       |
| `fx_gain`                   | `revenue:fx-gain:realised`                | revenue   | credit      |
| `fx_loss`                   | `expense:fx-loss:realised`                | expense   | debit       |
"""

from __future__ import annotations

import re
from typing import Final

from ledger.accounts import AccountType, account_type_of
from ledger.errors import validation_error
from ledger.invariants import check
from ledger.money import is_currency

SEGMENT_PATTERN: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
"""One variable part of an account id (buyer id, SKU, provider, payee)."""

JURISDICTION_PATTERN: Final = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
"""`DE`, `GB`, `US-WA`: ISO 3166-1 alpha-2, optionally with an ISO 3166-2 subdivision."""


PLATFORM_WIDE_PREFIXES: Final = (
    "asset:cash:",
    "asset:disputes-held:",
    "liability:deferred-revenue:",
    "liability:tax-payable:",
    "revenue:",
    "expense:",
)
"""Account families every buyer's or participant's flows touch (one cash account per provider and
currency takes every payment): the node books them as split accounts (docs/ARCHITECTURE.md "Hot
accounts"), so a payment (cash <- a buyer's receivable) stays a single-shard journal. None of them
is overdraft-guarded. Per-buyer and per-participant accounts (receivables, customer credit,
payables, holdbacks) stay ordinary: each lives on one shard."""


def is_platform_wide(account_id: str) -> bool:
    """True for the chart's hot, platform-wide accounts (`PLATFORM_WIDE_PREFIXES`)."""
    return account_id.startswith(PLATFORM_WIDE_PREFIXES)


def check_segment(value: str, field: str) -> str:
    """`value` if it can be one segment of an account id, else a VALIDATION_ERROR naming `field`."""
    if not SEGMENT_PATTERN.fullmatch(value):
        raise validation_error(f"{field} must be 1-64 characters of [A-Za-z0-9._-]", field)
    return value


def _account(account_id: str, expected: AccountType) -> str:
    check(account_type_of(account_id) is expected, f"chart built an invalid account id {account_id!r}")
    return account_id


def cash(provider: str, currency: str) -> str:
    """Money held at a payment provider (or bank) in one currency."""
    check(is_currency(currency), f"cash account for unknown currency {currency!r}")
    return _account(f"asset:cash:{check_segment(provider, 'provider')}:{currency}", AccountType.ASSET)


def receivable(buyer_id: str) -> str:
    """Accounts receivable: what one buyer owes on issued invoices."""
    return _account(f"asset:ar:{check_segment(buyer_id, 'buyer_id')}", AccountType.ASSET)


def deferred_revenue(sku: str) -> str:
    """Invoiced (net of tax) but not yet delivered, per SKU."""
    return _account(f"liability:deferred-revenue:{check_segment(sku, 'sku')}", AccountType.LIABILITY)


def tax_payable(jurisdiction: str) -> str:
    """VAT / GST / sales tax collected and owed to one tax authority (`DE`, `GB`, `US-WA`)."""
    check(bool(JURISDICTION_PATTERN.fullmatch(jurisdiction)), f"bad jurisdiction {jurisdiction!r}")
    return _account(f"liability:tax-payable:{jurisdiction}", AccountType.LIABILITY)


def customer_credit(buyer_id: str) -> str:
    """Money a buyer paid beyond what they owe (overpayments), usable later or refundable."""
    return _account(f"liability:customer-credit:{check_segment(buyer_id, 'buyer_id')}", AccountType.LIABILITY)


def royalties_payable(payee: str) -> str:
    """Royalties accrued to a creator / rights holder and not yet paid out."""
    return _account(f"liability:royalties-payable:{check_segment(payee, 'payee')}", AccountType.LIABILITY)


def royalty_payable(participant_id: str) -> str:
    """Royalties accrued to a participant and payable (finance/royalties.py), not yet paid out."""
    return _account(
        f"liability:royalty:{check_segment(participant_id, 'participant_id')}", AccountType.LIABILITY
    )


def royalty_holdback(participant_id: str) -> str:
    """The held-back part of a participant's accrued royalties, until its release date."""
    return _account(
        f"liability:royalty-holdback:{check_segment(participant_id, 'participant_id')}", AccountType.LIABILITY
    )


def revenue(sku: str) -> str:
    """Recognised (delivered) revenue per SKU."""
    return _account(f"revenue:sales:{check_segment(sku, 'sku')}", AccountType.REVENUE)


def platform_fees(sku: str) -> str:
    """The platform's fee share of a sale when revenue is split with a creator."""
    return _account(f"revenue:platform-fees:{check_segment(sku, 'sku')}", AccountType.REVENUE)


def refunds_contra(sku: str) -> str:
    """Contra revenue: refunds of recognised revenue (a revenue account with a debit balance)."""
    return _account(f"revenue:refunds:{check_segment(sku, 'sku')}", AccountType.REVENUE)


def royalty_expense(sku: str) -> str:
    """The cost of royalties owed on sales of one SKU."""
    return _account(f"expense:royalties:{check_segment(sku, 'sku')}", AccountType.EXPENSE)


def payment_fees(provider: str) -> str:
    """Processing fees a payment provider keeps."""
    return _account(f"expense:payment-fees:{check_segment(provider, 'provider')}", AccountType.EXPENSE)


def fx_gain() -> str:
    """Realised foreign-exchange gains on settlement."""
    return _account("revenue:fx-gain:realised", AccountType.REVENUE)


def fx_loss() -> str:
    """Realised foreign-exchange losses on settlement."""
    return _account("expense:fx-loss:realised", AccountType.EXPENSE)


def disputes_held(provider: str, currency: str) -> str:
    """Money a provider withholds while a buyer's dispute (chargeback) is open, per currency."""
    check(is_currency(currency), f"disputes-held account for unknown currency {currency!r}")
    return _account(
        f"asset:disputes-held:{check_segment(provider, 'provider')}:{currency}", AccountType.ASSET
    )


def dispute_losses(provider: str) -> str:
    """Lost disputes beyond what was still refundable on the invoice (money gone twice)."""
    return _account(f"expense:dispute-losses:{check_segment(provider, 'provider')}", AccountType.EXPENSE)
