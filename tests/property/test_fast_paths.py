"""Property tests: the front end's fast paths answer exactly what the detailed paths answer.

`JournalWire` + `journal_from_wire` (ledger), `decode_batch` (a batch body), `route` (grouping
per destination) and `batch_answer` (the response and the audit payload) each have a simpler,
slower reference: the detailed `JournalIn` + `validate_journal` path, and the front end's code as
it was before the fast paths. Random journals, valid and invalid, must give the same journal or
the same rejection (code, message, details with `field`) through both.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.messages import ENCODER, CrossItem, PostItem, Result
from api.audit_log import post_batch_payload
from api.ledger_routes import FX_PENDING, BatchIn, batch_answer, decode_batch
from api.posting import COORDINATOR, Submission, destination, route
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import (
    Journal,
    JournalIn,
    JournalWire,
    decode_journal,
    has_fx_fields,
    journal_from_wire,
    journal_in_of,
    rejection_from_msgspec,
    validate_fields,
    validate_journal,
    validate_wire,
)
from ledger.money import INT64_MAX
from sharding.slots import SlotMap, even_slot_map
from signer.canonical import canonical, digest, posted_body, posted_journal, request_hash

GOOD_ACCOUNTS = [
    "asset:cash",
    "asset:bank",
    "liability:cust:1",
    "equity:capital",
    "revenue:sales.eu",
    "expense:fees_2024-Q1",
    "asset:" + "x" * 194,
]
BAD_ACCOUNTS = [
    "cash",
    "asset:",
    "Asset:cash",
    "income:x",
    "asset:ca sh",
    "asset:x\n",
    "asset:" + "x" * 195,
    "",
]
IDS = ["j-1", "jrn:2024.05_a-b", "j" * 200]
BAD_IDS = ["", "bad id", "j/1", "x" * 201, "j1\n", "caf\u00e9"]
GOOD_TS = ["2024-05-01T12:00:00Z", "2024-05-01t12:00:00.123456789+02:00", "2024-05-01 12:00:00-05:30"]
BAD_TS = ["2024-05-01T12:00:00", "2024-05-01", "yesterday", "2024-13-01T00:00:00Z", "2025-W47-1T12:00:00Z"]
CURRENCIES = ["USD", "EUR", "JPY"]
BAD_CURRENCIES = ["usd", "XYZ", "US", "", "DEM"]


BAD_LINE_VALUES: dict[str, Any] = {
    "account_id": st.sampled_from(BAD_ACCOUNTS),
    "side": st.sampled_from(["DEBIT", "", 1]),
    "amount_cents": st.sampled_from([0, -1, INT64_MAX + 1, 10**30, "100", 1.5, True, None]),
    "currency": st.sampled_from([*BAD_CURRENCIES, 7]),
    "meta": st.sampled_from(["x", [], 1]),
}


FX_VALUES: dict[str, list[Any]] = {
    "fx_rate": ["0.92", "1", "1e5", "", None, 1.1],
    "rate_ts": [*GOOD_TS, "yesterday", None, 5],
}


@st.composite
def wire_line(draw: st.DrawFn, good: bool) -> dict[str, Any]:
    """One line as JSON: valid when `good`, else with one or two defects."""
    line: dict[str, Any] = {
        "account_id": draw(st.sampled_from(GOOD_ACCOUNTS)),
        "side": draw(st.sampled_from(["debit", "credit"])),
        "amount_cents": draw(st.one_of(st.integers(1, 1000), st.sampled_from([INT64_MAX, 2**62 + 1]))),
        "currency": draw(st.sampled_from(CURRENCIES)),
    }
    if draw(st.booleans()):
        line["meta"] = draw(st.sampled_from([{}, {"z": 1, "a": [1, {"b": None}]}]))
    if draw(st.integers(0, 5)) == 0:  # FX fields (D2): never the fast path
        for name, values in FX_VALUES.items():
            if draw(st.booleans()):
                line[name] = draw(st.sampled_from(values))
    if good:
        return line
    for _ in range(draw(st.integers(1, 2))):
        # account and currency defects are found after decoding, so they are drawn more often
        defect = draw(
            st.sampled_from([*BAD_LINE_VALUES, "account_id", "account_id", "currency", "colour", "missing"])
        )
        if defect == "colour":
            line["colour"] = "red"
        elif defect == "missing":
            del line[draw(st.sampled_from(sorted(line)))]
        else:
            line[defect] = draw(BAD_LINE_VALUES[defect])
    return line


@st.composite
def balanced(draw: st.DrawFn, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add one offsetting line per currency that does not net to zero (integer amounts only)."""
    net: dict[Any, int] = {}
    for line in lines:
        value = line.get("amount_cents")
        if isinstance(value, int) and not isinstance(value, bool) and line.get("side") in ("debit", "credit"):
            key = line.get("currency")
            net[key] = net.get(key, 0) + (value if line["side"] == "debit" else -value)
    out = list(lines)
    for key, value in net.items():
        if value and isinstance(key, str):
            offset = {"account_id": draw(st.sampled_from(GOOD_ACCOUNTS)), "amount_cents": abs(value)}
            offset |= {"side": "credit" if value > 0 else "debit", "currency": key}
            out.append(offset)
    return draw(st.permutations(out))


BAD_JOURNAL_VALUES: dict[str, Any] = {
    "journal_id": st.sampled_from([*BAD_IDS, 5]),
    "reverses": st.sampled_from([*BAD_IDS, 5]),
    "ts": st.sampled_from([*BAD_TS, 3]),
    "context": st.sampled_from(["ctx", [], 1]),
    "memo": st.sampled_from([5, {}]),
    "source_ref": st.sampled_from([5, []]),
}


@st.composite
def journal_doc(draw: st.DrawFn) -> Any:
    """A journal as a client might send it: valid, or with one or more defects anywhere."""
    good = draw(st.integers(0, 2)) == 0
    count = draw(st.sampled_from([1, 2, 2, 2, 3, 4]))
    lines = [draw(wire_line(good or draw(st.integers(0, 3)) > 0)) for _ in range(count)]
    if draw(st.integers(0, 3)) > 0:
        lines = draw(balanced(lines))
    if draw(st.integers(0, 40)) == 0:
        lines = [{"account_id": f"asset:a{i}", "side": "debit", "amount_cents": 1, "currency": "USD"}
                 for i in range(256)]  # fmt: skip
        lines += [{"account_id": "equity:c", "side": "credit", "amount_cents": 256, "currency": "USD"}]
        lines = lines[-draw(st.sampled_from([255, 256, 257])) :]
    if not good and draw(st.integers(0, 9)) == 0:
        lines = lines[: draw(st.integers(0, 1))]
    doc: dict[str, Any] = {"entries": lines}
    optional = {
        "journal_id": st.sampled_from(IDS),
        "reverses": st.sampled_from(IDS),
        "ts": st.sampled_from(GOOD_TS),
        "context": st.sampled_from([{}, {"source": "bench"}, {"b": [1, {"a": 2}]}]),
        "memo": st.sampled_from(["memo", None]),
        "source_ref": st.sampled_from(["src", None]),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            doc[name] = draw(values)
    if good:
        return doc
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        name = draw(st.sampled_from(sorted(BAD_JOURNAL_VALUES)))
        doc[name] = draw(BAD_JOURNAL_VALUES[name])
    if draw(st.integers(0, 9)) == 0:
        doc["colour"] = "red"
    if draw(st.integers(0, 19)) == 0:
        del doc["entries"]
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from([5, "x", [], None]))
    return doc


Outcome = Journal | tuple[str, str, dict[str, Any]]


def _outcome(error: LedgerError) -> tuple[str, str, dict[str, Any]]:
    return (str(error.code), error.message, error.details)


def detailed(raw: bytes) -> Outcome:
    """The detailed path: decode as `JournalIn`, then `validate_journal`."""
    try:
        return validate_journal(decode_journal(raw))
    except Rejection as rejection:
        return _outcome(rejection)


def fast(raw: bytes) -> Outcome:
    """The fast path: decode as `JournalWire` (else the detailed path), then `validate_wire`."""
    try:
        wire = msgspec.json.decode(raw, type=JournalWire)
    except msgspec.ValidationError:
        reference = detailed(raw)
        assert not isinstance(reference, Journal), "JournalWire refused a journal the detailed path accepts"
        return reference
    except msgspec.DecodeError:
        return detailed(raw)
    quick = journal_from_wire(wire)
    if has_fx_fields(journal_in_of(wire).entries):
        assert quick is None, "a journal with FX fields took the fast path"
    try:
        journal = validate_wire(wire)
    except Rejection as rejection:
        assert quick is None, "journal_from_wire accepted a journal validate_journal rejects"
        return _outcome(rejection)
    assert quick is None or quick == journal
    return journal


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journal_doc())
def test_wire_path_agrees_with_the_detailed_path(doc: Any) -> None:
    """Same journal, or the same rejection code, message and details (field), through both paths."""
    raw = json.dumps(doc).encode()
    outcome = fast(raw)
    assert outcome == detailed(raw)
    if isinstance(outcome, Journal):  # the shard's stored body is the canonical form, byte for byte
        stamp = "2026-11-22T08:00:00.000001Z"
        assert posted_body(outcome, "j-1", "service:p", stamp) == canonical(
            posted_journal(outcome, "j-1", "service:p", stamp)
        )


# -- a whole batch body ------------------------------------------------------------------------
def reference_decode_batch(body: bytes, who: str, key: str | None) -> list[Submission | Rejection]:
    """The batch decode as it was before the fast path: each journal as `JournalIn`, then validated."""
    try:
        raws = msgspec.json.decode(body, type=BatchIn).journals
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None
    if len(raws) > 8190:
        raise LedgerError(ErrorCode.BATCH_TOO_LARGE, "too large", {"count": len(raws)})
    if not raws:
        raise validation_error("journals must not be empty", "$.journals")
    subs: list[Submission | Rejection] = []
    for index, raw in enumerate(raws):
        try:
            journal_in = msgspec.json.decode(raw, type=JournalIn)
        except msgspec.ValidationError as exc:
            subs.append(rejection_from_msgspec(exc, prefix=f"$.journals[{index}]"))
            continue
        if has_fx_fields(journal_in.entries):  # awaits D2 completion, once its fields are valid
            try:
                validate_fields(journal_in)
            except Rejection as rejection:
                field = rejection.details.get("field")
                assert isinstance(field, str)
                rejection.details["field"] = f"$.journals[{index}]" + field[1:]
                subs.append(rejection)
                continue
            subs.append(FX_PENDING)
            continue
        try:
            journal = validate_journal(journal_in)
        except Rejection as rejection:
            field = rejection.details.get("field")
            if isinstance(field, str) and field.startswith("$"):
                rejection.details["field"] = f"$.journals[{index}]" + field[1:]
            subs.append(rejection)
            continue
        subs.append(Submission(journal, who, f"{key}#{index}" if key is not None else None))
    return subs


def _comparable(sub: Submission | Rejection) -> Any:
    return _outcome(sub) if isinstance(sub, Rejection) else sub


@st.composite
def batch_body(draw: st.DrawFn) -> bytes:
    """A batch body: mostly a list of journals, sometimes broken as a whole."""
    journals = draw(st.lists(journal_doc(), min_size=0, max_size=6))
    body: Any = {"journals": journals}
    shape = draw(st.integers(0, 19))
    if shape == 0:
        body["extra"] = 1
    elif shape == 1:
        body = journals
    elif shape == 2:
        body = {"journals": 5}
    elif shape == 3:
        body = {}
    data = json.dumps(body).encode()
    if draw(st.integers(0, 19)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_body(), st.sampled_from([None, "key-1"]))
def test_decode_batch_agrees_with_the_journal_by_journal_decode(body: bytes, key: str | None) -> None:
    """Per journal: the same submission or rejection (field under `$.journals[i]`); whole-body errors
    the same; LEDGER_IMBALANCE rejections carry the journal's client id for the conflict lookup."""
    try:
        expected = reference_decode_batch(body, "svc", key)
    except LedgerError as error:
        try:
            decode_batch(body, "svc", key)
        except LedgerError as got:
            assert (got.code, got.details.get("field")) == (error.code, error.details.get("field"))
            if error.code is ErrorCode.VALIDATION_ERROR:
                assert got.message == error.message
            return
        raise AssertionError(f"decode_batch accepted a body the reference refuses: {error}") from None
    batch = decode_batch(body, "svc", key)
    assert [_comparable(s) for s in batch.subs] == [_comparable(s) for s in expected]
    assert batch.rejected == sum(isinstance(s, Rejection) for s in expected)
    assert batch.reverses == any(isinstance(s, Submission) and s.journal.reverses for s in expected)
    raws = msgspec.json.decode(body, type=BatchIn).journals
    unbalanced = {
        i: msgspec.json.decode(raws[i], type=JournalIn).journal_id
        for i, s in enumerate(expected)
        if isinstance(s, Rejection) and s.code is ErrorCode.LEDGER_IMBALANCE
    }
    assert {i: journal_id for i, (_, journal_id) in batch.unbalanced.items()} == unbalanced
    assert all(batch.subs[i] is rejection for i, (rejection, _) in batch.unbalanced.items())
    assert sorted(batch.fx) == [i for i, s in enumerate(expected) if s is FX_PENDING]
    assert all(has_fx_fields(journal_in.entries) for journal_in in batch.fx.values())


# -- routing -----------------------------------------------------------------------------------
SLOT_MAP = SlotMap(even_slot_map(4))
ROUTED_ACCOUNTS = [f"{kind}:acct-{n}" for n in range(12) for kind in ("asset", "liability")]


def reference_route(submissions: list[Submission]) -> dict[int, tuple[list[int], list[Any]]]:
    """`Poster.post`'s grouping as it was: `destination()` per journal, `digest(canonical())`."""
    groups: dict[int, tuple[list[int], list[Any]]] = {}
    for index, sub in enumerate(submissions):
        journal_id = sub.journal.journal_id or f"jrn-{uuid.uuid4().hex}"
        hashed = digest(canonical(sub.journal))
        parts = destination(sub.journal, SLOT_MAP.shard_of)
        if len(parts) == 1:
            (dest,) = parts
            item: Any = PostItem(sub.journal, journal_id, sub.principal, sub.idem_key, hashed)
        else:
            dest = COORDINATOR
            item = CrossItem(sub.journal, journal_id, sub.principal, sub.idem_key, hashed, parts)
        indexes, items = groups.setdefault(dest, ([], []))
        indexes.append(index)
        items.append(item)
    return groups


@st.composite
def submissions(draw: st.DrawFn) -> list[Submission]:
    """Valid journals of 2..5 lines over accounts of several shards, each with a client id."""
    subs = []
    for n in range(draw(st.integers(1, 12))):
        accounts = draw(st.lists(st.sampled_from(ROUTED_ACCOUNTS), min_size=1, max_size=4))
        amount = draw(st.integers(1, 100))
        lines = [
            {"account_id": a, "side": "debit", "amount_cents": amount, "currency": "USD"} for a in accounts
        ]
        credit = draw(st.sampled_from(ROUTED_ACCOUNTS))
        lines.append({"account_id": credit, "side": "credit", "amount_cents": amount * len(accounts),
                      "currency": "USD"})  # fmt: skip
        raw = json.dumps({"journal_id": f"r-{n}", "entries": draw(st.permutations(lines))}).encode()
        journal = validate_journal(decode_journal(raw))
        subs.append(Submission(journal, "svc", draw(st.sampled_from([None, f"k#{n}"]))))
    return subs


@settings(max_examples=300, deadline=None)
@given(submissions())
def test_route_agrees_with_the_destination_grouping(subs: list[Submission]) -> None:
    """Same destinations in the same order, same indexes, same items and the same msgpack bytes."""
    got = route(subs, SLOT_MAP.shard_of)
    expected = reference_route(subs)
    assert list(got) == list(expected)
    for dest, (indexes, items) in expected.items():
        assert got[dest][0] == indexes
        assert got[dest][1] == items
        assert ENCODER.encode(got[dest][1]) == ENCODER.encode(items)
    for sub in subs:
        assert request_hash(sub.journal) == digest(canonical(sub.journal))


# -- the answer --------------------------------------------------------------------------------
def reference_answer(
    subs: list[Submission | Rejection], posted: list[Result]
) -> tuple[list[dict[str, Any]], dict[str, str], Counter[str]]:
    """`post_batch`'s answer loop as it was: dict items, a hash per id, a Counter of outcomes."""
    results: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}
    outcomes: Counter[str] = Counter()
    answers = iter(posted)
    for sub in subs:
        if isinstance(sub, Rejection):
            results.append({"ok": False, "journal_id": None, "error": sub.as_dict()})
            outcomes[str(sub.code)] += 1
            continue
        result = next(answers)
        outcomes[result.code or "OK"] += 1
        if result.ok:
            results.append({"ok": True, "journal_id": result.journal_id, "posted_at": result.posted_at})
            if result.hash is not None:
                hashes[result.journal_id] = result.hash.hex()
        else:
            code = ErrorCode(result.code or ErrorCode.INTERNAL_ERROR)
            error = LedgerError(code, result.message or code.value, dict(result.details or {}))
            results.append({"ok": False, "journal_id": result.journal_id, "error": error.as_dict()})
    return results, hashes, outcomes


JOURNAL = validate_journal(decode_journal(json.dumps({"entries": [
    {"account_id": "asset:a", "side": "debit", "amount_cents": 1, "currency": "USD"},
    {"account_id": "equity:b", "side": "credit", "amount_cents": 1, "currency": "USD"},
]}).encode()))  # fmt: skip

result = st.one_of(
    st.builds(
        Result,
        journal_id=st.sampled_from(["a", "b", "c"]),
        ok=st.just(True),
        posted_at=st.sampled_from(["2026-01-01T00:00:00.000001Z", None]),
        hash=st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
        code=st.sampled_from([None, None, None, "", "X"]),
    ),
    st.builds(
        Result,
        journal_id=st.sampled_from(["a", "d"]),
        ok=st.just(False),
        code=st.sampled_from(["INSUFFICIENT_FUNDS", "SERVICE_UNAVAILABLE", None]),
        message=st.sampled_from([None, "no"]),
        details=st.sampled_from([None, {"retryable": True}]),
    ),
)
answer_item = st.one_of(
    result,
    st.sampled_from(
        [
            validation_error("bad", "$.journals[0].entries"),
            Rejection(ErrorCode.LEDGER_IMBALANCE, "off", {"currency": "USD", "debits": 1, "credits": 2}),
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(answer_item, min_size=1, max_size=12))
def test_batch_answer_gives_the_same_bytes_counts_and_audit_payload(mixed: list[Any]) -> None:
    """The response body, the outcome counts (keys in first-seen order) and the audit bytes are equal."""
    subs: list[Submission | Rejection] = [
        Submission(JOURNAL, "svc", None) if isinstance(m, Result) else m for m in mixed
    ]
    posted = [m for m in mixed if isinstance(m, Result)]
    answer = batch_answer(subs, posted)
    results, hashes, outcomes = reference_answer(subs, posted)
    encode = msgspec.json.encode
    assert encode({"ok": True, "results": answer.items}) == encode({"ok": True, "results": results})
    assert list(answer.outcomes.items()) == list(outcomes.items())
    assert answer.hashes == hashes
    ids = [str(r["journal_id"]) for r in results if r.get("ok")]
    assert answer.posted == ids
    old_payload = {"journals": [{"journal_id": j, "hash": hashes.get(j)} for j in ids],
                   "rejected": len(results) - len(ids)}  # fmt: skip
    assert canonical(post_batch_payload(answer.posted, len(subs), answer.hashes)) == canonical(old_payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(wire_line(True), min_size=2, max_size=4), st.data())
def test_fx_fields_never_take_the_fast_path(lines: list[dict[str, Any]], data: st.DataObject) -> None:
    """A balanced, valid journal with `fx_rate` or `rate_ts` on any line: `journal_from_wire` answers
    None and `validate_journal` refuses it naming the first FX field (the API completes it first)."""
    for line in lines:
        line["amount_cents"] = min(line["amount_cents"], 1000)  # the offsetting lines stay in int64
    lines = data.draw(balanced(lines))
    index = data.draw(st.integers(0, len(lines) - 1))
    name = data.draw(st.sampled_from(["fx_rate", "rate_ts"]))
    for line in lines:
        line.pop("fx_rate", None)
        line.pop("rate_ts", None)
    lines[index][name] = "0.92" if name == "fx_rate" else GOOD_TS[0]
    raw = json.dumps({"entries": lines}).encode()
    wire = msgspec.json.decode(raw, type=JournalWire)
    assert journal_from_wire(wire) is None
    outcome = detailed(raw)
    assert not isinstance(outcome, Journal)
    assert outcome[0] == "VALIDATION_ERROR" and outcome[2]["field"] == f"$.entries[{index}].{name}"
    assert fast(raw) == outcome
