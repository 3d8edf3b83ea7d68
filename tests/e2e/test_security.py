"""A node serving HTTPS with mTLS and OIDC, as a client sees it: handshakes, identities, 2FA, and the
admin endpoints `GET /health/proofs` and `POST /admin/resend-journal` (issue 9 items 4-6)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from api.admin_routes import resend_statement
from api.oidc import OidcSettings
from tests.support.node import NodeHarness, auth, journal
from tests.support.security import AUDIENCE, ISSUER, CertificateAuthority, Issuer, client_context


class Secure:
    """The node plus the credentials the tests use."""

    def __init__(
        self, harness: NodeHarness, directory: Path, ca: CertificateAuthority, issuer: Issuer
    ) -> None:
        self.harness, self.directory, self.ca, self.issuer = harness, directory, ca, issuer
        self.service = ca.issue("marketplace")
        self.auditor = ca.issue("exports")
        self.unmapped = ca.issue("stranger")
        self.foreign = CertificateAuthority(directory, name="Other CA").issue("marketplace")

    def context(self, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
        assert self.ca.cert_path is not None
        return client_context(self.ca.cert_path, cert)

    def jwt(self, role: str, sub: str = "alice", amr: tuple[str, ...] = ("pwd", "mfa")) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.token(roles=[role], sub=sub, amr=amr)}"}


@pytest.fixture(scope="module")
def secure(ray_cluster: None) -> Iterator[Secure]:
    directory = Path(tempfile.mkdtemp(prefix="ledger-security-"))
    ca = CertificateAuthority(directory)
    server_cert, server_key = ca.issue("ledger-node", server=True)
    client_map = directory / "clients.map"
    client_map.write_text("cn:marketplace service\ncn:exports auditor\n")
    issuer = Issuer()
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    harness = NodeHarness(
        config_overrides={
            "tls_cert": server_cert,
            "tls_key": server_key,
            "client_ca": ca.cert_path,
            "client_map": client_map,
            "oidc": OidcSettings(ISSUER, AUDIENCE, jwks_file=jwks),
        }
    ).start()
    yield Secure(harness, directory, ca, issuer)
    harness.stop()


async def _call(
    secure: Secure,
    cert: tuple[Path, Path] | None,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(ssl=secure.context(cert), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.request(method, secure.harness.url + path, headers=headers, json=body) as response,
    ):
        return response.status, await response.json()


def test_mtls_handshake_identity_and_health(secure: Secure) -> None:
    """Tried: HTTPS with client certificates: /health says mTLS true; a mapped service certificate
    posts a journal with no token and its audit event names `mtls:cn:marketplace`; a mapped auditor
    certificate may read but not post (403); an unmapped certificate needs a token (401, then 200
    with the service token); a client with no certificate, or one from another CA, is refused in
    the TLS handshake (no HTTP answer at all); plain HTTP gets nothing either."""

    async def scenario() -> None:
        assert secure.harness.url.startswith("https://")
        status, health = await _call(secure, secure.service, "GET", "/health")
        assert status == 200 and health["mTLS"] is True and health["oidc"] is True, health
        journal_id = f"jrn-mtls-{uuid.uuid4().hex[:8]}"
        status, answer = await _call(
            secure,
            secure.service,
            "POST",
            "/ledger/post",
            body=journal(journal_id, "asset:cash", "revenue:sales"),
        )
        assert status == 200 and answer["ok"], answer
        status, answer = await _call(secure, secure.auditor, "GET", f"/ledger/{journal_id}")
        assert status == 200, answer
        status, answer = await _call(
            secure, secure.auditor, "POST", "/ledger/post", body=journal(None, "asset:cash", "revenue:sales")
        )
        assert status == 403 and answer["error"]["code"] == "NOT_AUTHORIZED", answer
        status, answer = await _call(secure, secure.unmapped, "GET", f"/ledger/{journal_id}")
        assert status == 401 and answer["error"]["details"]["reason"] == "missing", answer
        status, answer = await _call(secure, secure.unmapped, "GET", f"/ledger/{journal_id}", auth("service"))
        assert status == 200, answer
        status, events = await _call(secure, secure.auditor, "GET", "/audit/events?limit=1000")
        posts = [e for e in events["events"] if e["payload"].get("journal_id") == journal_id]
        assert [e["actor_id"] for e in posts] == ["mtls:cn:marketplace"], posts
        for cert in (None, secure.foreign):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                await _call(secure, cert, "GET", "/health")
        with pytest.raises(aiohttp.ClientError):
            async with aiohttp.ClientSession() as http:
                plain = secure.harness.url.replace("https://", "http://") + "/health"
                async with http.get(plain) as response:
                    await response.read()

    asyncio.run(scenario())


def test_oidc_operators_second_factor_and_static_tokens(secure: Secure) -> None:
    """Tried on the running node: an operator JWT with mfa reads /health/proofs; without mfa it is
    401 mfa_required there but may still post a journal (a write the service role may also do);
    with OIDC on, the static admin token is 401 static_token_disabled while the static service
    token works; an expired JWT is 401 token_expired; auth comes before validation (an auditor's
    unparseable journal is 403, an anonymous one 401)."""

    async def scenario() -> None:
        cert = secure.unmapped
        status, answer = await _call(secure, cert, "GET", "/health/proofs", secure.jwt("operator"))
        assert status == 200, answer
        status, answer = await _call(
            secure, cert, "GET", "/health/proofs", secure.jwt("operator", amr=("pwd",))
        )
        assert status == 401 and answer["error"]["details"]["reason"] == "mfa_required", answer
        status, answer = await _call(
            secure, cert, "POST", "/ledger/post", secure.jwt("operator", amr=("pwd",)),
            journal(None, "asset:cash", "revenue:sales"),
        )  # fmt: skip
        assert status == 200, answer
        status, answer = await _call(secure, cert, "GET", "/health/proofs", auth("admin"))
        assert status == 401 and answer["error"]["details"]["reason"] == "static_token_disabled", answer
        status, answer = await _call(secure, cert, "GET", "/keys", auth("service"))
        assert status == 200, answer
        expired = {"Authorization": f"Bearer {secure.issuer.token(exp=int(time.time()) - 600)}"}
        status, answer = await _call(secure, cert, "GET", "/keys", expired)
        assert status == 401 and answer["error"]["details"]["reason"] == "token_expired", answer
        status, answer = await _call(secure, cert, "POST", "/ledger/post", secure.jwt("auditor"), {"bad": 1})
        assert status == 403, answer
        status, answer = await _call(secure, cert, "POST", "/ledger/post", None, {"bad": 1})
        assert status == 401, answer

    asyncio.run(scenario())


def test_health_proofs_reports_signing_state_and_catches_a_bad_checkpoint(secure: Secure) -> None:
    """Tried: after traffic, /health/proofs names the software signer loudly, each shard's and the
    audit stream's newest signed batch with its age, and the latest checkpoint with a verified
    signature; with that checkpoint's signature corrupted in the database it reports
    `signature_verified: false` and a problem (restored afterwards)."""

    async def scenario() -> None:
        cert, admin = secure.unmapped, secure.jwt("admin")
        for n in range(8):
            await _call(
                secure, secure.service, "POST", "/ledger/post", body=journal(None, f"asset:h{n}", "revenue:h")
            )
        health: dict[str, Any] = {}
        for _ in range(100):
            _, health = await _call(secure, cert, "GET", "/health/proofs", admin)
            checkpoint = health["last_checkpoint"]
            if checkpoint and all(
                s["latest_batch"] and s["latest_batch"]["logged"] for s in health["shards"]
            ):
                break
            await asyncio.sleep(0.1)
        assert health["signer"]["backend"] == "software" and health["signer"]["hsm"] is False
        assert "NOT AN HSM" in health["signer"]["warning"]
        assert [s["shard"] for s in health["shards"]] == [0, 1, 2, 3, "audit"]
        assert all(s["latest_batch"]["age_s"] >= 0 for s in health["shards"]), health
        checkpoint = health["last_checkpoint"]
        assert (
            checkpoint["signature_verified"] is True and checkpoint["age_s"] >= 0 and health["problems"] == []
        )
        conn = await asyncpg.connect(secure.harness.dsn)
        try:
            size = checkpoint["tree_size"]
            original = await conn.fetchval("SELECT signature FROM checkpoints WHERE tree_size = $1", size)
            forged = bytes(original[:-1]) + bytes([original[-1] ^ 1])
            await conn.execute("UPDATE checkpoints SET signature = $2 WHERE tree_size = $1", size, forged)
            try:
                _, bad = await _call(secure, cert, "GET", "/health/proofs", admin)
            finally:
                await conn.execute(
                    "UPDATE checkpoints SET signature = $2 WHERE tree_size = $1", size, original
                )
        finally:
            await conn.close()
        if bad["last_checkpoint"]["tree_size"] == size:  # else a newer checkpoint raced in
            assert bad["last_checkpoint"]["signature_verified"] is False
            assert bad["problems"] == [f"checkpoint {size}: signature does not verify"]

    asyncio.run(scenario())


def _signoff(
    key: ed25519.Ed25519PrivateKey, approver: str, journal_id: str, reason: str, resend_id: str
) -> dict[str, str]:
    signature = key.sign(resend_statement(journal_id, reason, resend_id))
    return {"approver_id": approver, "signature": base64.b64encode(signature).decode()}


def test_resend_journal_needs_reason_and_a_second_persons_signoff(secure: Secure) -> None:
    """Tried: admin alice resends a journal with bob's sign-off -> 200 and a committed `ledger.resend`
    audit event by `oidc:alice` carrying the journal's hash, reason and signer; the same call again
    replays it; the same resend_id for another reason -> 409; a forged sign-off -> 403
    signoff_invalid; alice signing off her own resend -> 403 self_signoff; a revoked approver -> 403;
    no reason -> 400; an unknown journal -> 404; an operator -> 403. The journal is never re-posted."""

    async def scenario() -> None:
        cert, alice = secure.unmapped, secure.jwt("admin", sub="alice")
        bob_key, alice_key, carol_key = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
        for approver, key in (("bob", bob_key), ("alice", alice_key), ("carol", carol_key)):
            pem = (
                key.public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                .decode()
            )
            status, answer = await _call(
                secure, cert, "POST", "/admin/approvers", alice, {"approver_id": approver, "public_key": pem}
            )
            assert status in {200, 201}, answer
        status, _ = await _call(secure, cert, "POST", "/admin/approvers/carol/revoke", alice, {})
        assert status == 200
        journal_id = f"jrn-resend-{uuid.uuid4().hex[:8]}"
        status, posted = await _call(
            secure,
            secure.service,
            "POST",
            "/ledger/post",
            body=journal(journal_id, "asset:cash", "revenue:sales"),
        )
        assert status == 200, posted
        reason, resend_id = "exporter missed it (INC-42)", f"resend-{uuid.uuid4().hex[:8]}"
        body = {
            "journal_id": journal_id, "reason": reason, "resend_id": resend_id,
            "signoff": _signoff(bob_key, "bob", journal_id, reason, resend_id),
        }  # fmt: skip
        status, first = await _call(secure, cert, "POST", "/admin/resend-journal", alice, body)
        assert status == 200 and first["replayed"] is False and first["signed_off_by"] == "bob", first
        _, stored = await _call(secure, cert, "GET", f"/ledger/{journal_id}", alice)
        assert first["hash"] == stored["audit"]["hash"]
        _, events = await _call(secure, cert, "GET", "/audit/events?limit=1000", alice)
        resends = [e for e in events["events"] if e["event_type"] == "ledger.resend"]
        event = next(e for e in resends if e["payload"]["resend_id"] == resend_id)
        assert event["seq"] == first["event"]["seq"] and event["actor_id"] == "oidc:alice"
        assert event["payload"]["journal_id"] == journal_id and event["payload"]["reason"] == reason
        assert event["payload"]["signed_off_by"] == "bob" and event["payload"]["hash"] == first["hash"]
        status, again = await _call(secure, cert, "POST", "/admin/resend-journal", alice, body)
        assert status == 200 and again["replayed"] is True and again["event"] == first["event"], again
        other = dict(
            body, reason="another", signoff=_signoff(bob_key, "bob", journal_id, "another", resend_id)
        )
        status, answer = await _call(secure, cert, "POST", "/admin/resend-journal", alice, other)
        assert status == 409 and answer["error"]["code"] == "IDEMPOTENCY_CONFLICT", answer
        fresh = f"resend-{uuid.uuid4().hex[:8]}"
        by_alice = _signoff(alice_key, "alice", journal_id, reason, fresh)
        by_carol = _signoff(carol_key, "carol", journal_id, reason, fresh)
        cases = [
            (dict(body, resend_id=fresh), 403, "signoff_invalid"),  # bob signed another resend_id
            (dict(body, resend_id=fresh, signoff=by_alice), 403, "self_signoff"),
            (dict(body, resend_id=fresh, signoff=by_carol), 403, "signoff_unknown_approver"),
        ]
        for case, want, why in cases:
            status, answer = await _call(secure, cert, "POST", "/admin/resend-journal", alice, case)
            assert status == want and answer["error"]["details"]["reason"] == why, (why, answer)
        status, answer = await _call(
            secure,
            cert,
            "POST",
            "/admin/resend-journal",
            alice,
            {k: v for k, v in body.items() if k != "reason"},
        )
        assert status == 400 and answer["error"]["code"] == "VALIDATION_ERROR", answer
        missing = f"jrn-missing-{uuid.uuid4().hex[:6]}"
        case = dict(
            body,
            journal_id=missing,
            resend_id=fresh,
            signoff=_signoff(bob_key, "bob", missing, reason, fresh),
        )
        status, answer = await _call(secure, cert, "POST", "/admin/resend-journal", alice, case)
        assert status == 404 and answer["error"]["details"]["resource"] == "journal", answer
        status, answer = await _call(
            secure, cert, "POST", "/admin/resend-journal", secure.jwt("operator"), body
        )
        assert status == 403, answer
        conn = await asyncpg.connect(secure.harness.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM journals WHERE journal_id = $1", journal_id) == 1
        finally:
            await conn.close()

    asyncio.run(scenario())
