"""Unit tests of the batch fast paths (`decode_batch`, `journal_from_wire`, `route`, `batch_answer`).

The property tests (`tests/property/test_fast_paths.py`) prove agreement with the detailed paths
on random input; these pin the cases a client would notice: one bad journal in a full batch, the
size limit, the exact bytes of an answer, generated ids.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

import msgspec
import pytest

from actors.messages import PostItem, Result
from api.audit_log import post_batch_payload
from api.ledger_routes import BATCH_JOURNALS_MAX, batch_answer, decode_batch
from api.posting import COORDINATOR, Submission, route
from ledger.accounts import KNOWN_ACCOUNT_TYPES, AccountType, account_type_of
from ledger.errors import ErrorCode, LedgerError, Rejection
from ledger.journal import JournalWire, journal_from_wire
from ledger.money import CURRENCY_MINOR_UNITS, CurrencyCode, is_currency
from sharding.slots import SlotMap, even_slot_map
from signer.canonical import canonical


def _journal(n: int, amount: int = 100, currency: str = "USD", **extra: Any) -> dict[str, Any]:
    return {
        "journal_id": f"fp-{n}",
        "entries": [
            {
                "account_id": f"asset:fp-{n % 50}",
                "side": "debit",
                "amount_cents": amount,
                "currency": currency,
            },
            {
                "account_id": f"liability:fp-{n % 7}",
                "side": "credit",
                "amount_cents": amount,
                "currency": currency,
            },
        ],
        **extra,
    }


def _body(journals: list[Any]) -> bytes:
    return json.dumps({"journals": journals}).encode()


def test_a_full_batch_with_one_bad_journal_fails_only_that_journal() -> None:
    """8,190 journals, #4000 with an unknown currency and #4001 unbalanced: only those two fail,
    with the batch path of the field; the others are submissions with their batch idempotency key."""
    journals = [_journal(n) for n in range(BATCH_JOURNALS_MAX)]
    journals[4000]["entries"][1]["currency"] = "XYZ"
    journals[4001]["entries"][1]["amount_cents"] = 99
    batch = decode_batch(_body(journals), "svc", "k")
    assert len(batch.subs) == BATCH_JOURNALS_MAX and batch.rejected == 2
    bad = batch.subs[4000]
    assert isinstance(bad, Rejection) and bad.code is ErrorCode.VALIDATION_ERROR
    assert bad.details["field"] == "$.journals[4000].entries[1].currency"
    unbalanced = batch.subs[4001]
    assert isinstance(unbalanced, Rejection) and unbalanced.code is ErrorCode.LEDGER_IMBALANCE
    assert batch.unbalanced == {4001: (unbalanced, "fp-4001")}
    good = batch.subs[4002]
    assert isinstance(good, Submission) and good.idem_key == "k#4002" and good.journal.journal_id == "fp-4002"


def test_the_size_limit_holds_on_the_fast_path() -> None:
    """8,191 well-formed journals are BATCH_TOO_LARGE; an empty list is a VALIDATION_ERROR."""
    with pytest.raises(LedgerError) as info:
        decode_batch(_body([_journal(n) for n in range(BATCH_JOURNALS_MAX + 1)]), "svc", None)
    assert info.value.code is ErrorCode.BATCH_TOO_LARGE
    assert info.value.details == {"limit": BATCH_JOURNALS_MAX, "count": BATCH_JOURNALS_MAX + 1}
    with pytest.raises(Rejection) as empty:
        decode_batch(_body([]), "svc", None)
    assert empty.value.details["field"] == "$.journals"


def test_reverses_is_noticed_for_the_existence_check() -> None:
    """A valid journal naming a journal it reverses flags the batch (the route then checks the name)."""
    assert not decode_batch(_body([_journal(1)]), "svc", None).reverses
    assert decode_batch(_body([_journal(1), _journal(2, reverses="fp-1")]), "svc", None).reverses


def test_currency_decode_type_is_exactly_the_active_code_list() -> None:
    """`CurrencyCode` (checked by msgspec) accepts exactly what `is_currency` accepts."""
    codes = set(typing.get_args(CurrencyCode))
    assert codes == set(CURRENCY_MINOR_UNITS)
    assert all(is_currency(code) for code in codes)


def test_known_account_types_only_hold_accepted_ids() -> None:
    """The cache view holds an id once `account_type_of` accepted it, never a malformed one."""
    assert account_type_of("expense:known-view-1") is AccountType.EXPENSE
    assert KNOWN_ACCOUNT_TYPES["expense:known-view-1"] is AccountType.EXPENSE
    assert account_type_of("expense:bad id") is None
    assert "expense:bad id" not in KNOWN_ACCOUNT_TYPES


def test_first_sight_accounts_and_long_journals_take_the_general_path() -> None:
    """Ids never seen before and journals of more than two lines validate the same way."""
    doc = _journal(0)
    doc["entries"][0]["account_id"] = "asset:never-seen-before-fp"
    doc["entries"].append(
        {"account_id": "revenue:fp-x", "side": "credit", "amount_cents": 1, "currency": "USD"}
    )
    doc["entries"][0]["amount_cents"] = 101
    journal = journal_from_wire(msgspec.json.decode(json.dumps(doc).encode(), type=JournalWire))
    assert journal is not None
    assert [(line.line_no, line.account_type) for line in journal.lines] == [
        (0, AccountType.ASSET),
        (1, AccountType.LIABILITY),
        (2, AccountType.REVENUE),
    ]


def test_answer_bytes_are_the_documented_shape() -> None:
    """`{ok, journal_id, posted_at}` per posted journal and `{ok, journal_id, error}` per refused one."""
    rejection = Rejection(ErrorCode.VALIDATION_ERROR, "bad", {"field": "$.journals[0]"})
    journal_sub = decode_batch(_body([_journal(1)]), "svc", None).subs[0]
    assert isinstance(journal_sub, Submission)
    posted = [
        Result("fp-1", True, "2026-01-01T00:00:00.000001Z", hash=b"\x01" * 32),
        Result("fp-2", False, code="INSUFFICIENT_FUNDS", message="short", details={"account_id": "asset:x"}),
    ]
    answer = batch_answer([rejection, journal_sub, journal_sub], posted)
    assert msgspec.json.encode(answer.items) == (
        b'[{"ok":false,"journal_id":null,"error":{"code":"VALIDATION_ERROR","message":"bad",'
        b'"details":{"field":"$.journals[0]"}}},'
        b'{"ok":true,"journal_id":"fp-1","posted_at":"2026-01-01T00:00:00.000001Z"},'
        b'{"ok":false,"journal_id":"fp-2","error":{"code":"INSUFFICIENT_FUNDS","message":"short",'
        b'"details":{"account_id":"asset:x"}}}]'
    )
    assert dict(answer.outcomes) == {"VALIDATION_ERROR": 1, "OK": 1, "INSUFFICIENT_FUNDS": 1}
    payload = canonical(post_batch_payload(answer.posted, 3, answer.hashes))
    assert payload == b'{"journals":[{"hash":"' + b"01" * 32 + b'","journal_id":"fp-1"}],"rejected":2}'


def test_route_generates_an_id_only_when_the_client_gave_none() -> None:
    """A journal without `journal_id` gets `jrn-<32 hex>`; one with an id keeps it."""
    anonymous = _journal(3)
    del anonymous["journal_id"]
    subs = decode_batch(_body([anonymous, _journal(4)]), "svc", None).subs
    groups = route([s for s in subs if isinstance(s, Submission)], SlotMap(even_slot_map(1)).shard_of)
    assert list(groups) == [0] and COORDINATOR not in groups
    first, second = groups[0][1]
    assert isinstance(first, PostItem) and re.fullmatch(r"jrn-[0-9a-f]{32}", first.journal_id)
    assert second.journal_id == "fp-4"


def test_place_sends_split_lines_with_the_others() -> None:
    """Tried: split lines beside lines of one shard, of two shards, and alone (see api.posting.place)."""
    from api.posting import ANY, COORDINATOR, place
    from ledger.accounts import AccountType
    from ledger.journal import Line

    homes = {"asset:a": 1, "asset:b": 2, "revenue:fee": ANY, "liability:pool": ANY}

    def line(account: str, side: str = "debit") -> Line:
        kind = AccountType(account.split(":", maxsplit=1)[0])
        return Line(0, account, kind, side, 100, "USD", {})  # type: ignore[arg-type]

    assert place((line("asset:a"), line("revenue:fee", "credit")), homes.__getitem__, 3) == (1, None)
    dest, parts = place(
        (line("asset:b"), line("asset:a"), line("revenue:fee", "credit")), homes.__getitem__, 3
    )
    assert dest == COORDINATOR and parts is not None
    assert {shard: [ln.account_id for ln in group] for shard, group in parts.items()} == {
        2: ["asset:b"],
        1: ["asset:a", "revenue:fee"],
    }
    assert place((line("liability:pool"), line("revenue:fee", "credit")), homes.__getitem__, 3) == (3, None)
