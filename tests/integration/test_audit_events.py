"""The audit-event stream on the real shared PostgreSQL with a real (software-key) signer.

What an auditor relies on: every recorded event has a contiguous seq, a hash over its canonical
body and a link to the previous hash; every event is in exactly one audit batch (shard -2) whose
statement is signed by a published key and taken into the global log by the next checkpoint; a
payload edited in SQL is named by `verify_audit_chain`; a signing failure writes nothing; a
restarted writer continues the chain. `GET /audit/events` serves all of it with a cursor.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from actors.signer_engine import SignerEngine
from api import audit_log
from api.app import ROLES, front_middleware
from api.audit_log import AUDIT_WRITER, audit_event, decode_cursor, encode_cursor
from api.auth import WRITERS, Authenticator, parse_tokens
from api.envelope import ok
from api.limits import LIMITER, Limiter, LimitSettings
from api.services import SERVICES, Services
from sharding.slots import SlotMap, even_slot_map
from signer.canonical import canonical
from signer.keys import verify_signature
from signer.merkle import inclusion_proof, leaf_hash, verify_inclusion
from signer.merkle import root as reference_root
from signer.statements import batch_statement as reference_statement
from signer.statements import statement_digest
from store import audit, resend_repo
from store.audit import AUDIT_STREAM, AuditSigningError, AuditWriter, verify_audit_chain
from tests.support.signer import started_signer

TOKENS = {"svc-token": "service", "aud-token": "auditor", "adm-token": "admin"}


class EnginePort:
    """The signer port over a `SignerEngine` in this process (what the Ray shell does remotely)."""

    def __init__(self, engine: SignerEngine) -> None:
        self.engine = engine

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]:
        return self.engine.sign_statements(statements)


@dataclass
class Env:
    dsn: str
    conn: asyncpg.Connection
    engine: SignerEngine
    port: EnginePort

    async def writer(self) -> AuditWriter:
        writer = AuditWriter(self.dsn, self.port)
        await writer.start()
        return writer


@contextlib.asynccontextmanager
async def environment() -> AsyncIterator[Env]:
    """A fresh migrated database, a started software-key signer and a connection."""
    async with started_signer("ledger_audit", checkpoint_every_s=3600) as (dsn, conn, engine):
        yield Env(dsn, conn, engine, EnginePort(engine))


async def _counts(conn: asyncpg.Connection) -> tuple[int, int]:
    events = await conn.fetchval("SELECT count(*) FROM audit_events")
    batches = await conn.fetchval("SELECT count(*) FROM batches WHERE shard_id = $1", AUDIT_STREAM)
    return events, batches


async def _check_batches_signed(conn: asyncpg.Connection) -> int:
    """Each audit batch: statement and root as `signer` builds them, and a valid signature."""
    keys = {r["kid"]: r for r in await conn.fetch("SELECT kid, pem, algorithm FROM signer_keys")}
    batches = await conn.fetch("SELECT * FROM batches WHERE shard_id = $1 ORDER BY batch_seq", AUDIT_STREAM)
    for number, b in enumerate(batches, start=1):
        assert b["batch_seq"] == number
        hashes = [
            bytes(h)
            for h in await conn.fetchval(
                "SELECT array_agg(hash ORDER BY seq) FROM audit_events WHERE seq BETWEEN $1 AND $2",
                b["first_seq"],
                b["last_seq"],
            )
        ]
        assert len(hashes) == b["last_seq"] - b["first_seq"] + 1
        assert bytes(b["root"]) == reference_root(hashes)
        statement = msgspec.json.decode(bytes(b["statement"]))
        assert canonical(statement) == bytes(b["statement"])
        key = keys[b["signer_kid"]]
        expected = reference_statement(
            shard=-2, batch_seq=number, first_seq=b["first_seq"], last_seq=b["last_seq"], hash_alg="sha256",
            root=bytes(b["root"]), signed_at=statement["signed_at"], signer_kid=b["signer_kid"],
            signer="software",
        )  # fmt: skip
        assert statement == expected
        assert verify_signature(
            key["pem"], key["algorithm"], statement_digest(statement), bytes(b["signature"])
        )
    return len(batches)


def test_shared_pieces_match_signer() -> None:
    """store/audit.py restates canonical JSON, the RFC 9162 root and the batch statement: pin them."""
    rng = random.Random(7)
    for n in [*range(0, 70), 127, 128, 129, 1000, 4096]:
        leaves = [rng.randbytes(32) for _ in range(n)]
        assert audit.merkle_root(leaves) == reference_root(leaves), n
    value = {"b": [1, {"z": None, "a": "é"}], "a": True, "c": -3}
    assert audit.canonical(value) == canonical(value)
    ours = audit.batch_statement(5, 9, 2, b"\x01" * 32, "2026-01-01T00:00:00.000000Z")
    theirs = reference_statement(
        shard=-2, batch_seq=2, first_seq=5, last_seq=9, hash_alg="sha256", root=b"\x01" * 32,
        signed_at="2026-01-01T00:00:00.000000Z", signer_kid="", signer="",
    )  # fmt: skip
    assert ours == theirs
    assert decode_cursor(encode_cursor(123456789)) == 123456789 and decode_cursor(None) == 0


def test_concurrent_events_chain_sign_and_checkpoint() -> None:
    async def scenario() -> None:
        async with environment() as env:
            writer = await env.writer()
            try:

                async def client(task: int) -> list[audit.AuditEventRef]:
                    return [
                        await writer.record(f"service:{task:02d}", "ledger.post", {"task": task, "n": n})
                        for n in range(50)
                    ]

                refs = [r for group in await asyncio.gather(*(client(t) for t in range(20))) for r in group]
            finally:
                await writer.close()
            conn = env.conn
            assert sorted(r.seq for r in refs) == list(range(1, 1001))
            assert all(r.batch_seq is not None for r in refs)
            seqs = await conn.fetchval("SELECT array_agg(seq ORDER BY seq) FROM audit_events")
            assert list(seqs) == list(range(1, 1001))
            rows = await conn.fetch("SELECT seq, body, hash, prev_hash FROM audit_events ORDER BY seq")
            by_seq = {r.seq: r for r in refs}
            prev = None
            for row in rows:
                body = bytes(row["body"])
                assert canonical(msgspec.json.decode(body)) == body
                assert bytes(row["hash"]) == by_seq[row["seq"]].hash
                assert (None if row["prev_hash"] is None else bytes(row["prev_hash"])) == prev
                prev = bytes(row["hash"])
            assert await verify_audit_chain(conn) == []
            assert await verify_audit_chain(conn, check_signature=verify_signature, page=97) == []
            uncovered = await conn.fetch(
                "SELECT e.seq, count(b.batch_seq) AS n FROM audit_events e LEFT JOIN batches b "
                "ON b.shard_id = -2 AND e.seq BETWEEN b.first_seq AND b.last_seq GROUP BY e.seq "
                "HAVING count(b.batch_seq) <> 1"
            )
            assert uncovered == []
            batches = await _check_batches_signed(conn)
            assert 1 < batches < 1000, "group commit: several events per batch"
            assert {r.batch_seq for r in refs} == set(range(1, batches + 1))
            # an event's inclusion under its batch's signed root
            batch = await conn.fetchrow("SELECT * FROM batches WHERE shard_id = -2 AND batch_seq = 2")
            hashes = [bytes(r["hash"]) for r in rows[batch["first_seq"] - 1 : batch["last_seq"]]]
            index = len(hashes) // 2
            path = inclusion_proof(index, [leaf_hash(h) for h in hashes])
            assert verify_inclusion(leaf_hash(hashes[index]), index, len(hashes), path, bytes(batch["root"]))
            # the signer's checkpoint takes every audit batch into the global log
            assert await env.engine.checkpoint() == batches
            logged = await conn.fetchval(
                "SELECT count(*) FROM batches WHERE shard_id = -2 AND log_index IS NOT NULL"
            )
            assert logged == batches
            checkpoint = msgspec.json.decode(
                await conn.fetchval("SELECT statement FROM checkpoints ORDER BY tree_size DESC LIMIT 1")
            )
            assert checkpoint["tree_size"] == batches
            assert checkpoint["shards"]["-2"] == {"batch_seq": batches, "last_seq": 1000}

    asyncio.run(scenario())


def test_tampered_payload_is_named() -> None:
    async def scenario() -> None:
        async with environment() as env:
            writer = await env.writer()
            try:
                await asyncio.gather(
                    *(writer.record("admin:x", "account.create", {"n": n}) for n in range(30))
                )
            finally:
                await writer.close()
            conn = env.conn
            assert await verify_audit_chain(conn) == []
            await conn.execute("""UPDATE audit_events SET payload = '{"n": 999}' WHERE seq = 17""")
            problems = await verify_audit_chain(conn)
            assert problems and all("seq 17" in p for p in problems), problems
            assert any("payload" in p for p in problems), problems
            # editing the hashed body instead breaks the hash and the batch root
            await conn.execute(
                "UPDATE audit_events SET payload = convert_from(body, 'UTF8')::jsonb->'payload' "
                "WHERE seq = 17"
            )
            assert await verify_audit_chain(conn) == []
            await conn.execute(
                "UPDATE audit_events SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                "'account.create', 'account.delete'), 'UTF8') WHERE seq = 4"
            )
            problems = await verify_audit_chain(conn)
            assert any("seq 4" in p and "SHA-256" in p for p in problems), problems
            # deleting the last event leaves its batch short
            await conn.execute("DELETE FROM audit_events WHERE seq = 30")
            problems = await verify_audit_chain(conn)
            assert any("of its" in p and "events exist" in p for p in problems), problems

    asyncio.run(scenario())


def test_payload_is_stored_once_in_the_body() -> None:
    """Migration 0027: new rows leave `payload` NULL and keep it only in the hashed body. Tried: a
    big batch-style payload and a small one -> NULL column, `audit_payload` (what the export and the
    resend lookup read) equals what was recorded, the chain verifies; a row stored the old way (the
    column filled) still verifies, and an edit of its column is still named."""

    async def scenario() -> None:
        async with environment() as env:
            writer = await env.writer()
            big = {
                "journals": [{"journal_id": f"j-{n}", "hash": "ab" * 32} for n in range(3000)],
                "rejected": 0,
            }
            small = {"resend_id": "r-1", "journal_id": "j-1"}
            try:
                await writer.record("service:x", "ledger.post_batch", big)
                await writer.record("admin:x", "ledger.resend", small)
            finally:
                await writer.close()
            conn = env.conn
            rows = await conn.fetch(
                "SELECT seq, payload, audit_payload(payload, body)::text AS p FROM audit_events"
            )
            assert [r["payload"] for r in rows] == [None, None]
            assert [msgspec.json.decode(r["p"]) for r in rows] == [big, small]
            assert await verify_audit_chain(conn) == []
            found = await resend_repo.earlier_resend(conn, "r-1")
            assert found is not None and msgspec.json.decode(found["payload"]) == small
            # a row written before 0027 (column filled): verified, and its column still compared
            await conn.execute("UPDATE audit_events SET payload = audit_payload(payload, body) WHERE seq = 2")
            assert await verify_audit_chain(conn) == []
            await conn.execute("""UPDATE audit_events SET payload = '{"resend_id": "r-2"}' WHERE seq = 2""")
            problems = await verify_audit_chain(conn)
            assert problems and all("seq 2" in p and "payload" in p for p in problems), problems
            assert await resend_repo.earlier_resend(conn, "r-1") is None  # the column wins where set

    asyncio.run(scenario())


def test_signing_failure_writes_nothing_and_restart_continues_the_chain() -> None:
    async def scenario() -> None:
        async with environment() as env:
            conn = env.conn
            writer = await env.writer()
            try:
                first = [await writer.record("service:a", "ledger.post", {"i": i}) for i in range(5)]
                before = await _counts(conn)
                env.engine.failing = True
                with pytest.raises(AuditSigningError):
                    await writer.record("service:a", "ledger.post", {"i": "lost"})
                results = await asyncio.gather(
                    *(writer.record("service:a", "ledger.post", {"j": j}) for j in range(10)),
                    return_exceptions=True,
                )
                assert all(isinstance(r, AuditSigningError) for r in results)
                assert await _counts(conn) == before
                assert writer.failures == 11
                env.engine.failing = False
                after = await writer.record("service:a", "ledger.post", {"i": 5})
                assert (
                    after.seq == 6 and after.prev_hash == first[-1].hash and after.batch_seq == before[1] + 1
                )
            finally:
                await writer.close()
            last = await conn.fetchrow("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            restarted = await env.writer()
            try:
                more = await restarted.record("service:b", "proof.generate", {"proof_id": "p-1"})
            finally:
                await restarted.close()
            assert more.seq == last["seq"] + 1
            assert more.prev_hash == bytes(last["hash"])
            assert more.batch_seq == after.batch_seq + 1  # type: ignore[operator]
            assert await verify_audit_chain(conn, check_signature=verify_signature) == []
            await _check_batches_signed(conn)

    asyncio.run(scenario())


# -- HTTP --------------------------------------------------------------------------------------------
async def _record_handler(request: web.Request) -> web.Response:
    """A stand-in for a state-changing route: records after 'acknowledging'."""
    await audit_event(request, "account.create", {"account_id": request.match_info["account_id"]})
    return ok(done=True)


def _app(pool: asyncpg.Pool, writer: AuditWriter) -> web.Application:
    """The audit routes behind the node's real middleware (envelope, shedding, auth), as in `create_app`."""
    services = Services(
        pool, SlotMap(even_slot_map(1)), {}, None, Authenticator(parse_tokens(
            ",".join(f"{t}={r}" for t, r in TOKENS.items())
        )), None,  # type: ignore[arg-type]
    )  # fmt: skip
    app = web.Application(middlewares=[front_middleware])
    app[SERVICES] = services
    app[LIMITER] = Limiter(LimitSettings())
    app[AUDIT_WRITER] = writer
    roles = {}
    for method, path, handler, allowed in [
        *audit_log.ROUTES,
        ("POST", "/record/{account_id}", _record_handler, WRITERS),
    ]:
        app.router.add_route(method, path, handler)
        roles[handler] = frozenset(allowed)
    app[ROLES] = roles
    return app


def _hdr(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_http_audit_events_pages_and_verifies() -> None:
    async def scenario() -> None:
        async with environment() as env:
            pool = await asyncpg.create_pool(env.dsn, min_size=1, max_size=2)
            writer = await env.writer()
            client = TestClient(TestServer(_app(pool, writer)))
            await client.start_server()
            try:
                for i in range(25):
                    response = await client.post(f"/record/asset:{i}", headers=_hdr("adm-token"))
                    assert response.status == 200, await response.text()
                await env.engine.checkpoint()
                keys = {
                    r["kid"]: r for r in await env.conn.fetch("SELECT kid, pem, algorithm FROM signer_keys")
                }
                events: list[dict[str, Any]] = []
                cursor = ""
                for _page in range(4):
                    response = await client.get(
                        "/audit/events", params={"limit": 10, "cursor": cursor}, headers=_hdr("aud-token")
                    )
                    body = await response.json()
                    assert response.status == 200 and body["ok"], body
                    events.extend(body["events"])
                    assert body["next_cursor"]
                    cursor = body["next_cursor"]
                    if not body["events"]:
                        break
                assert [e["seq"] for e in events] == list(range(1, 26))
                prev = None
                for event in events:
                    assert event["actor_id"].startswith("admin:") and event["event_type"] == "account.create"
                    assert event["payload"] == {"account_id": f"asset:{event['seq'] - 1}"}
                    fields = {k: event[k] for k in audit.BODY_FIELDS}
                    assert audit.sha256(canonical(fields)).hex() == event["hash"]
                    assert event["prev_hash"] == prev
                    prev = event["hash"]
                    statement = event["batch"]["statement"]
                    key = keys[event["signer_kid"]]
                    assert statement["root"] == event["batch"]["root"] and statement["shard"] == -2
                    assert statement["first_seq"] <= event["seq"] <= statement["last_seq"]
                    assert event["batch"]["log_index"] is not None
                    assert verify_signature(
                        key["pem"], key["algorithm"], statement_digest(statement),
                        base64.b64decode(event["signature"]),
                    )  # fmt: skip
                # an empty page still carries a cursor, and polling with it sees new events
                empty = await (
                    await client.get(f"/audit/events?cursor={cursor}", headers=_hdr("svc-token"))
                ).json()
                assert empty["events"] == [] and empty["next_cursor"] == cursor
                await client.post("/record/asset:new", headers=_hdr("svc-token"))
                newer = await (
                    await client.get(f"/audit/events?cursor={cursor}", headers=_hdr("aud-token"))
                ).json()
                assert [e["seq"] for e in newer["events"]] == [26]
                assert newer["events"][0]["actor_id"].startswith("service:")
                for query in (
                    "limit=0",
                    "limit=1001",
                    "limit=x",
                    "cursor=!!!",
                    f"cursor={encode_cursor(1)}x",
                ):
                    response = await client.get(f"/audit/events?{query}", headers=_hdr("aud-token"))
                    body = await response.json()
                    assert response.status == 400 and body["error"]["code"] == "VALIDATION_ERROR", (
                        query,
                        body,
                    )
                assert (await client.get("/audit/events")).status == 401
                # an audit failure is counted and logged but never fails the call that changed state
                env.engine.failing = True
                response = await client.post("/record/asset:unsigned", headers=_hdr("adm-token"))
                assert response.status == 200
                registry = client.app[SERVICES].metrics.registry
                failures = registry.get_sample_value(
                    "ledger_audit_failures_total", {"event_type": "account.create"}
                )
                assert failures == 1
                env.engine.failing = False
            finally:
                await client.close()
                await writer.close()
                await pool.close()
            assert await verify_audit_chain(env.conn) == []

    asyncio.run(scenario())


def test_node_records_ledger_calls(node: Any) -> None:
    """Through a real node: a posted journal yields one `ledger.post` event naming its hash."""
    from tests.support.node import auth, journal

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            posted = await http.post(
                f"{node.url}/ledger/post",
                json=journal("jrn-audit-1", "asset:a1", "revenue:r1"),
                headers=auth(),
            )
            assert posted.status == 200, await posted.text()
            body = await (
                await http.get(f"{node.url}/audit/events?limit=1000", headers=auth("auditor"))
            ).json()
            assert body["ok"], body
            events = [e for e in body["events"] if e["event_type"] == "ledger.post"]
            assert [e["payload"]["journal_id"] for e in events] == ["jrn-audit-1"]
            audit_block = (await (await http.get(f"{node.url}/ledger/jrn-audit-1", headers=auth())).json())[
                "audit"
            ]
            assert events[0]["payload"]["hash"] == audit_block["hash"]

    asyncio.run(scenario())


class SlowPort(EnginePort):
    """A signer that holds every signature until released (to catch the queue mid-flight)."""

    def __init__(self, engine: SignerEngine) -> None:
        super().__init__(engine)
        self.gate = asyncio.Event()

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]:
        await self.gate.wait()
        return self.engine.sign_statements(statements)


def test_enqueue_returns_before_commit_and_flush_waits_for_it() -> None:
    """Tried: queue 5 events while the signer is held; nothing is written yet, the futures are
    pending; `flush()` does not return before the signer is released, then all 5 are committed in
    order in one chain (what GET /audit/events relies on to read the events of answered calls)."""

    async def scenario() -> None:
        async with environment() as env:
            port = SlowPort(env.engine)
            writer = AuditWriter(env.dsn, port)
            await writer.start()
            try:
                futures = [await writer.enqueue("service:t", "test.event", {"n": n}) for n in range(5)]
                flushing = asyncio.ensure_future(writer.flush())
                await asyncio.sleep(0.2)
                assert not flushing.done() and not any(f.done() for f in futures)
                assert (await _counts(env.conn))[0] == 0
                port.gate.set()
                await asyncio.wait_for(flushing, 10)
                assert all(f.done() and f.exception() is None for f in futures)
                assert [f.result().seq for f in futures] == [1, 2, 3, 4, 5]
                assert (await _counts(env.conn))[0] == 5
            finally:
                port.gate.set()
                await writer.close()
            assert await verify_audit_chain(env.conn) == []

    asyncio.run(scenario())


def test_unawaited_writer_lingers_to_batch_events() -> None:
    """Tried: a writer whose callers do not wait (answer_after_commit=False) takes one event, then
    four more arrive while it lingers -> all five are committed in one signed batch; the chain verifies."""

    async def scenario() -> None:
        async with environment() as env:
            writer = AuditWriter(env.dsn, env.port, answer_after_commit=False)
            await writer.start()
            try:
                await writer.enqueue("service:t", "test.event", {"n": 0})
                for _ in range(5):
                    await asyncio.sleep(0)  # the writer takes the first event and starts lingering
                assert writer.queue.qsize() == 0
                for n in range(1, 5):
                    await writer.enqueue("service:t", "test.event", {"n": n})
                await asyncio.wait_for(writer.flush(), 10)
                assert await _counts(env.conn) == (5, 1)
            finally:
                await writer.close()
            assert await verify_audit_chain(env.conn) == []

    asyncio.run(scenario())
