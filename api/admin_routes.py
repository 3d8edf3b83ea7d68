"""Admin endpoints (DECISIONS D5: admin only): key rotation and the signed-off journal resend.

`POST /admin/resend-journal` re-emits an acknowledged journal to everything downstream of the
audit stream, never re-posting it (a re-post would move money twice; a journal is stored once).
It records a `ledger.resend` AuditEvent carrying the journal's `{journal_id, hash, posted_at}` (the
fields of its original `ledger.post` event) with the reason and the sign-off, so consumers that
follow `GET /audit/events` (exporters, notification relays) process the journal again; it is also
how an operator repairs a `ledger.post` event that was not recorded (`ledger_audit_failures_total`).

Sign-off: a second person, a registered and active multisig approver (`POST /admin/approvers`) who
is not the caller, signs the canonical JSON of `{action: "resend-journal", journal_id, reason,
resend_id}` with their key (Ed25519 or P-256, base64; the same keys `ledger-node approve` uses).
`resend_id` is the caller's unique id for this resend: a replay with the same body answers the
original result, another body with the same id is 409 IDEMPOTENCY_CONFLICT. The answer waits until
the event is committed (and signed): a resend that could not be audited did not happen.
"""

from __future__ import annotations

import asyncio
import base64
import re
import weakref
from typing import Any, Final

import msgspec
from aiohttp import web

from api.audit_log import AUDIT_WRITER
from api.auth import ADMINS, PRINCIPAL, Principal
from api.envelope import ok
from api.requests import decode_json, json_body
from api.services import SERVICES
from finance.multisig import decode_signature, parse_approver_key, verifies
from ledger.errors import ErrorCode, LedgerError, validation_error
from ledger.timestamps import rfc3339
from signer.canonical import canonical
from store import repository, resend_repo
from store.audit import AuditError

RESEND_ACTION: Final = "resend-journal"
REASON_MAX: Final = 500
RESEND_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def rotate_key(request: web.Request) -> web.Response:
    """POST /admin/keys/rotate: a new signing key (created in the HSM for PKCS#11) becomes active.

    Old keys stay published in GET /keys, so everything they signed still verifies.
    """
    svc = request.app[SERVICES]
    if svc.signer is None:
        raise LedgerError(ErrorCode.INVALID_STATE, "signing is off on this node", {"signer": "none"})
    try:
        kid = await svc.signer.rotate()
    except Exception as exc:
        raise LedgerError(
            ErrorCode.SIGNING_FAILURE, f"key rotation failed: {type(exc).__name__}", {}
        ) from exc
    return ok(signer_kid=kid, signer=svc.signer_kind)


class SignoffIn(msgspec.Struct, forbid_unknown_fields=True):
    """`signoff`: who signed off and their signature over the resend statement."""

    approver_id: str
    signature: str


class ResendIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /admin/resend-journal`."""

    journal_id: str
    reason: str
    resend_id: str
    signoff: SignoffIn


def resend_statement(journal_id: str, reason: str, resend_id: str) -> bytes:
    """The exact bytes a sign-off signs: canonical JSON of the action, journal, reason and resend id."""
    return canonical(
        {"action": RESEND_ACTION, "journal_id": journal_id, "reason": reason, "resend_id": resend_id}
    )


def _refuse(message: str, reason: str, **details: Any) -> LedgerError:
    return LedgerError(ErrorCode.NOT_AUTHORIZED, message, {"reason": reason, **details}, status=403)


def _checked(body: ResendIn) -> ResendIn:
    if not body.reason.strip() or len(body.reason) > REASON_MAX:
        raise validation_error(f"reason must be 1-{REASON_MAX} characters, not blank", "$.reason")
    if not RESEND_ID_PATTERN.fullmatch(body.resend_id):
        raise validation_error("resend_id must be 1-128 characters of [A-Za-z0-9._:-]", "$.resend_id")
    if not body.journal_id or len(body.journal_id) > 200:
        raise validation_error("journal_id must be 1-200 characters", "$.journal_id")
    return body


async def _check_signoff(conn: Any, body: ResendIn, caller: Principal) -> None:
    """403 unless a registered, active approver other than the caller signed this resend."""
    approver_id = body.signoff.approver_id
    signature = decode_signature(body.signoff.signature)
    if approver_id in {caller.name, caller.subject, *caller.identities}:
        raise _refuse("a resend needs the sign-off of someone other than the caller", "self_signoff")
    row = await resend_repo.active_approver(conn, approver_id)
    if row is None:
        raise _refuse(f"{approver_id} is not an active approver", "signoff_unknown_approver")
    key = parse_approver_key(row["approver_id"], row["public_key_pem"])
    if not verifies(key, resend_statement(body.journal_id, body.reason, body.resend_id), signature):
        raise _refuse("the sign-off signature does not verify", "signoff_invalid", approver_id=approver_id)


def _answer(
    payload: dict[str, Any], seq: int, event_hash: bytes, created_at: str, replayed: bool
) -> web.Response:
    event = {
        "event_type": resend_repo.RESEND_EVENT,
        "seq": seq,
        "hash": event_hash.hex(),
        "created_at": created_at,
    }
    return ok(
        resend_id=payload["resend_id"],
        journal_id=payload["journal_id"],
        hash=payload["hash"],
        posted_at=payload["posted_at"],
        signed_off_by=payload["signed_off_by"],
        event=event,
        replayed=replayed,
    )


_locks: weakref.WeakKeyDictionary[web.Application, asyncio.Lock] = weakref.WeakKeyDictionary()


async def resend_journal(request: web.Request) -> web.Response:
    """POST /admin/resend-journal: re-emit a journal's event with reason and sign-off; audited."""
    body = _checked(decode_json(await json_body(request), ResendIn))
    svc = request.app[SERVICES]
    writer = request.app.get(AUDIT_WRITER)
    if writer is None:
        raise LedgerError(ErrorCode.SERVICE_UNAVAILABLE, "the audit writer is not running", {})
    caller = request[PRINCIPAL]
    lock = _locks.setdefault(request.app, asyncio.Lock())
    async with lock:  # one resend at a time: the resend_id check and the record do not interleave
        await writer.flush()
        async with svc.pool.acquire() as conn:
            await _check_signoff(conn, body, caller)
            earlier = await resend_repo.earlier_resend(conn, body.resend_id)
            row = None if earlier is not None else await repository.journal_row(conn, body.journal_id)
        if earlier is not None:
            payload = msgspec.json.decode(earlier["payload"])
            same = (payload["journal_id"], payload["reason"], payload["signed_off_by"])
            if same != (body.journal_id, body.reason, body.signoff.approver_id):
                raise LedgerError(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    f"resend_id {body.resend_id} was used for another resend",
                    {"resend_id": body.resend_id},
                )
            return _answer(
                payload, earlier["seq"], bytes(earlier["hash"]), rfc3339(earlier["created_at"]), True
            )
        if row is None:
            raise LedgerError(
                ErrorCode.NOT_FOUND,
                f"no journal {body.journal_id}",
                {"resource": "journal", "id": body.journal_id},
            )
        payload = {
            "resend_id": body.resend_id,
            "journal_id": body.journal_id,
            "hash": bytes(row["hash"]).hex(),
            "posted_at": rfc3339(row["posted_at"]),
            "reason": body.reason,
            "signed_off_by": body.signoff.approver_id,
            "signoff_signature": base64.b64encode(decode_signature(body.signoff.signature)).decode(),
        }
        try:
            ref = await writer.record(caller.name, resend_repo.RESEND_EVENT, payload)
        except AuditError as exc:
            raise LedgerError(
                ErrorCode.SERVICE_UNAVAILABLE, f"resend not recorded, nothing was resent: {exc}", {}
            ) from exc
    return _answer(payload, ref.seq, ref.hash, ref.created_at, False)


ROUTES: Final = [
    ("POST", "/admin/keys/rotate", rotate_key, ADMINS),
    ("POST", "/admin/resend-journal", resend_journal, ADMINS),
]
