"""The finance service's pure parts: the invoice hash signed with the issue journal, payment ids."""

from __future__ import annotations

import hashlib
import json

from finance.invoices import Buyer, LineItem, create_invoice
from finance.service import document_hash, invoice_document, payment_id_of, request_digest

GOLDEN_DOCUMENT_HASH = "ec6ccb85044253743618d3e4b9a1258f0f4b7226fd3398c23aa5f553aadbbc46"


def _invoice_document() -> dict[str, object]:
    invoice = create_invoice(
        "inv-golden-1",
        Buyer("buyer-1", "FR"),
        [LineItem("sku-a", 3, 333, "standard"), LineItem("sku-b", 1, 999, "ebook")],
        "EUR",
    )
    assert (invoice.subtotal, invoice.tax, invoice.total) == (1998, 255, 2253)
    return invoice_document(invoice, "2026-12-31", "net 30")


def test_invoice_hash_is_sha256_of_sorted_compact_json() -> None:
    """The issue journal's `context.invoice_hash` is pinned: a client re-derives it from the document."""
    document = _invoice_document()
    plain = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert document_hash(document) == hashlib.sha256(plain).hexdigest() == GOLDEN_DOCUMENT_HASH


def test_payment_ids_and_request_digests_are_deterministic() -> None:
    """A retried payment names the same payment (and journal); key order never changes a digest."""
    assert payment_id_of("stripe", "pi_1") == payment_id_of("stripe", "pi_1")
    assert payment_id_of("stripe", "pi_1") != payment_id_of("stripe", "pi_2")
    assert payment_id_of("stripe", "pi_1").startswith("pay-")
    assert payment_id_of("stripe", "pi_1", "rfd").startswith("rfd-")
    assert request_digest({"b": 1, "a": [1, 2]}) == request_digest({"a": [1, 2], "b": 1})
