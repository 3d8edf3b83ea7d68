"""Decoding and classification of Kafka payment events, dead-letter records and commit points."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import msgspec
import pytest

from api.kafka_consumer import DeadLetter, _Acks, dead_letter
from api.kafka_events import Outcome, Poison, Reason, Result, classify_answer, classify_error, decode_event
from api.kafka_sinks import BATCH_EVENT, batch_payload, http_request
from ledger.errors import ErrorCode, LedgerError, Rejection
from signer.canonical import canonical

GOOD = {
    "event_id": "e1",
    "type": "settlement",
    "invoice_id": "inv-1",
    "amount": 1190,
    "currency": "EUR",
    "provider": "stripe",
    "provider_reference": "pi_1",
    "settlement_id": "st-1",
}


def test_a_valid_event_decodes_and_maps_to_the_http_settlement_body() -> None:
    """Tried: a settlement event -> decoded, and sent as POST /settlement with the seed's names."""
    event = decode_event(json.dumps(GOOD).encode())
    path, body = http_request(event)
    assert path == "/settlement"
    assert body["payment"] == {
        "provider": "stripe",
        "reference": "pi_1",
        "amount_cents": 1190,
        "currency": "EUR",
    }


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", Reason.UNDECODABLE),
        (None, Reason.UNDECODABLE),
        (b"\xff\xfe", Reason.UNDECODABLE),
        (json.dumps({**GOOD, "amount": 11.9}).encode(), Reason.INVALID),
        (json.dumps({**GOOD, "amount": 0}).encode(), Reason.INVALID),
        (json.dumps({**GOOD, "type": "chargeback"}).encode(), Reason.INVALID),
        (json.dumps({**GOOD, "surprise": 1}).encode(), Reason.INVALID),
        (json.dumps({k: v for k, v in GOOD.items() if k != "settlement_id"}).encode(), Reason.INVALID),
    ],
)
def test_poison_is_named_by_reason(raw: bytes | None, reason: Reason) -> None:
    """Tried: bad JSON, a tombstone, floats, zero, an unknown type or field, a settlement without id
    -> Poison with the reason that lands in the dead-letter record."""
    with pytest.raises(Poison) as caught:
        decode_event(raw)
    assert caught.value.reason == reason


def test_ledger_answers_are_classified_retry_or_poison() -> None:
    """Tried: 503, shard moving, signing failure and a connection error -> RETRY; NOT_FOUND,
    INVALID_STATE and IDEMPOTENCY_CONFLICT -> POISON with their code (in-process and over HTTP)."""
    for code in (ErrorCode.SERVICE_UNAVAILABLE, ErrorCode.SHARD_MOVING, ErrorCode.SIGNING_FAILURE):
        assert classify_error(LedgerError(code, "x")).outcome == Outcome.RETRY
    assert classify_error(ConnectionRefusedError()).outcome == Outcome.RETRY
    for code in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_STATE, ErrorCode.IDEMPOTENCY_CONFLICT):
        result = classify_error(Rejection(code, "no"))
        assert (result.outcome, result.reason, result.code) == (Outcome.POISON, Reason.REJECTED, str(code))
    unavailable = {"ok": False, "error": {"code": "SERVICE_UNAVAILABLE", "message": "down"}}
    assert classify_answer(503, unavailable).outcome == Outcome.RETRY
    assert classify_answer(502, {"ok": False}).outcome == Outcome.RETRY
    assert classify_answer(401, {"ok": False, "error": {"code": "NOT_AUTHORIZED"}}).outcome == Outcome.RETRY
    missing = classify_answer(404, {"ok": False, "error": {"code": "NOT_FOUND", "message": "gone"}})
    assert (missing.outcome, missing.code) == (Outcome.POISON, "NOT_FOUND")
    assert classify_answer(200, {"ok": True, "journal_id": "j"}).outcome == Outcome.POSTED


def test_dead_letter_carries_reason_origin_and_exact_bytes() -> None:
    """Tried: a non-UTF-8 poison record -> the letter names reason, topic, partition, offset and
    group, keeps the exact bytes in base64 and no text."""
    record = SimpleNamespace(topic="payments", partition=2, offset=41, key=b"k", value=b"\xff{")
    raw = dead_letter(record, Result(Outcome.POISON, Reason.UNDECODABLE, None, "bad"), "g", None)
    letter = msgspec.json.decode(raw, type=DeadLetter)
    assert (letter.reason, letter.topic, letter.partition, letter.offset) == (
        "undecodable",
        "payments",
        2,
        41,
    )
    assert base64.b64decode(letter.value_base64) == b"\xff{" and letter.value is None


def test_commit_point_is_the_acknowledged_prefix() -> None:
    """Tried: offsets 10..13 with 10, 11 and 13 acknowledged -> commit 12 (never past 12 while it
    is open); once 12 is acknowledged -> 14."""
    records = [SimpleNamespace(topic="t", partition=0, offset=o) for o in range(10, 14)]
    acks = _Acks()
    acks.begin(records)
    for index in (0, 1, 3):
        acks.ack(records[index])
    (tp,) = acks.open
    assert acks.commit_point(tp) == 12
    acks.ack(records[2])
    assert acks.commit_point(tp) == 14


def test_a_batch_audit_payload_lists_each_posted_event_like_its_http_event() -> None:
    """Tried: a batch that posted a settlement, a refund and a payment without a journal ->
    one `kafka.batch` payload: payments and refunds in batch order, each with the HTTP event's keys
    plus event_id and its journal's hash (null without a journal), canonical-encodable."""
    settlement = decode_event(json.dumps(GOOD).encode())
    refund = decode_event(
        json.dumps({**GOOD, "event_id": "e2", "type": "refund", "settlement_id": None}).encode()
    )
    free = decode_event(
        json.dumps({**GOOD, "event_id": "e3", "type": "payment", "settlement_id": None}).encode()
    )
    common = {"invoice_id": "inv-1", "amount": 1190, "currency": "EUR", "status": "paid", "extra": 1}
    posted = [
        (settlement, {**common, "payment_id": "pay-1", "journal_id": "inv-1.pay.pay-1"}),
        (refund, {**common, "refund_id": "rfd-1", "journal_id": "inv-1.refund.rfd-1"}),
        (free, {**common, "payment_id": "pay-2", "journal_id": None}),
    ]
    payload = batch_payload(posted, {"inv-1.pay.pay-1": "aa", "inv-1.refund.rfd-1": "bb"})
    keys = ("invoice_id", "journal_id", "amount", "currency", "status")

    def entry(kind: str, index: int, event_id: str, settlement_id: str | None, hashed: str | None) -> dict:
        answer = posted[index][1]
        return {
            f"{kind}_id": answer[f"{kind}_id"],
            **{k: answer[k] for k in keys},
            "event_id": event_id,
            "settlement_id": settlement_id,
            "journal_hash": hashed,
        }

    assert payload["payments"] == [
        entry("payment", 0, "e1", "st-1", "aa"),
        entry("payment", 2, "e3", None, None),
    ]
    assert payload["refunds"] == [entry("refund", 1, "e2", None, "bb")]
    assert BATCH_EVENT == "kafka.batch" and json.loads(canonical(payload)) == payload
