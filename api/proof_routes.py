"""Proof endpoints: generate a signed proof package for a range, read it, download it, consistency.

`POST /proofs/generate` (and its twin `POST /finance/verify`, DECISIONS D7) records a `proofs` row in
status `generating` and builds the package in a background task (at most `MAX_GENERATIONS` at a
time per node); `GET /proofs/{proof_id}` reports the status and, once ready, the package hash and the
signed checkpoint it rests on; `GET /proofs/{proof_id}/package` downloads the package, which an
auditor checks offline with `ledger-node verify` (docs/proofs.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
import weakref
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from aiohttp import web

from api.audit_log import audit_event
from api.auth import READERS, Role
from api.envelope import ok
from api.ledger_routes import principal, services
from api.requests import IDEMPOTENCY_KEY_PATTERN, idempotency_key, json_body
from api.services import Services
from ledger.errors import ErrorCode, LedgerError, validation_error
from ledger.journal import rejection_from_msgspec
from ledger.timestamps import parse_rfc3339, rfc3339
from signer.keys import SigningError
from signer.package import PackageError, SignedCheckpoint
from store import proofs as proof_store
from store import signing_health

log = logging.getLogger(__name__)

GENERATORS: Final = frozenset({Role.OPERATOR, Role.AUDITOR, Role.ADMIN})
OPERATORS: Final = frozenset({Role.OPERATOR, Role.ADMIN})
MAX_GENERATIONS: Final = 2
INDEX_MAX: Final = 2**63 - 1
SIGNER_WARNINGS: Final = {
    "software": "SOFTWARE SIGNING KEY, NOT AN HSM: development only (set LEDGER_PKCS11_MODULE)",
    "none": "SIGNING IS OFF (LEDGER_SIGNING=off): journals are chained but not signed",
}


class RangeIn(msgspec.Struct, forbid_unknown_fields=True):
    """`range`: `{from_ts, to_ts}` (RFC 3339) or `{from_seq, to_seq}` (global log indexes)."""

    from_ts: str | None = None
    to_ts: str | None = None
    from_seq: int | None = None
    to_seq: int | None = None


class ProofRequestIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /proofs/generate` and `POST /finance/verify` body; `caller` is free-form."""

    range: RangeIn
    request_id: str | None = None
    caller: Any = None


class _PackageHead(msgspec.Struct):
    """The part of a stored package `GET /proofs/{id}` reports (the rest is skipped)."""

    checkpoint: SignedCheckpoint


_request_decoder: Final = msgspec.json.Decoder(ProofRequestIn)
_head_decoder: Final = msgspec.json.Decoder(_PackageHead)


# -- background generation --------------------------------------------------------------------
class ProofRunner:
    """The node's proof generations: at most MAX_GENERATIONS at once; tasks kept until done."""

    def __init__(self) -> None:
        self.gate = asyncio.Semaphore(MAX_GENERATIONS)
        self.tasks: set[asyncio.Task[None]] = set()
        self.started = datetime.now(UTC)
        self.recovered = False

    def start(self, svc: Services, proof_id: str, rng: dict[str, Any]) -> None:
        """Generate `proof_id` in the background."""
        task = asyncio.create_task(self._generate(svc, proof_id, rng), name=f"proof-{proof_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def recover(self, svc: Services) -> None:
        """Once per process: rows left `generating` by an earlier process will never finish."""
        if self.recovered:
            return
        self.recovered = True
        async with svc.pool.acquire() as conn:
            await conn.execute(
                "UPDATE proofs SET status = 'failed', error = $1 "
                "WHERE status = 'generating' AND created_at < $2",
                _error_text(
                    LedgerError(ErrorCode.INTERNAL_ERROR, "interrupted: the node restarted while generating")
                ),
                self.started,
            )

    async def close(self) -> None:
        """Cancel running generations (node shutdown)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _generate(self, svc: Services, proof_id: str, rng: dict[str, Any]) -> None:
        async with self.gate:
            try:
                async with svc.pool.acquire() as conn:
                    data = await proof_store.build_proof_package(
                        conn,
                        svc.signer,
                        proof_id=proof_id,
                        generated_at=rfc3339(datetime.now(UTC)),
                        rng=rng,
                        signer_kind=svc.signer_kind,
                    )
            except asyncio.CancelledError:
                await self._fail(svc, proof_id, LedgerError(ErrorCode.INTERNAL_ERROR, "cancelled"))
                raise
            except Exception as exc:
                await self._fail(svc, proof_id, _as_ledger_error(proof_id, exc))
                return
            async with svc.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE proofs SET status = 'ready', ready_at = now(), package = $2, package_hash = $3 "
                    "WHERE proof_id = $1",
                    proof_id,
                    data,
                    hashlib.sha256(data).digest(),
                )

    @staticmethod
    async def _fail(svc: Services, proof_id: str, error: LedgerError) -> None:
        try:
            async with svc.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE proofs SET status = 'failed', ready_at = now(), error = $2 WHERE proof_id = $1",
                    proof_id,
                    _error_text(error),
                )
        except Exception:
            log.exception("could not record the failure of proof %s", proof_id)


_RUNNERS: Final[weakref.WeakKeyDictionary[web.Application, ProofRunner]] = weakref.WeakKeyDictionary()


def runner(app: web.Application) -> ProofRunner:
    """The proof runner of an application (created on first use)."""
    found = _RUNNERS.get(app)
    if found is None:
        found = _RUNNERS[app] = ProofRunner()
    return found


async def shutdown(app: web.Application) -> None:
    """`on_cleanup` hook: cancel the application's running generations."""
    found = _RUNNERS.pop(app, None)
    if found is not None:
        await found.close()


def _as_ledger_error(proof_id: str, exc: Exception) -> LedgerError:
    if isinstance(exc, LedgerError):
        return exc
    if isinstance(exc, SigningError):
        return LedgerError(ErrorCode.SIGNING_FAILURE, f"signer unavailable: {exc}")
    if isinstance(exc, PackageError):
        log.error("proof %s: package could not be built: %s", proof_id, exc)
        return LedgerError(ErrorCode.INTERNAL_ERROR, f"package could not be built: {exc}")
    log.error("proof %s failed", proof_id, exc_info=exc)
    return LedgerError(ErrorCode.INTERNAL_ERROR, "proof generation failed", {"reason": type(exc).__name__})


def _error_text(error: LedgerError) -> str:
    return msgspec.json.encode(error.as_dict()).decode()


def _error_dict(text: str | None) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(text or "")
    except msgspec.DecodeError:
        value = None
    if isinstance(value, dict):
        return value
    return {"code": ErrorCode.INTERNAL_ERROR.value, "message": text or "failed", "details": {}}


# -- requests ---------------------------------------------------------------------------------
def _validated_range(rng: RangeIn) -> dict[str, Any]:
    """The range as a plain dict with exactly one kind, both ends given and in order."""
    times = (rng.from_ts, rng.to_ts)
    seqs = (rng.from_seq, rng.to_seq)
    if any(v is not None for v in times) and any(v is not None for v in seqs):
        raise validation_error("range is either {from_ts, to_ts} or {from_seq, to_seq}, not both", "$.range")
    if rng.from_ts is not None or rng.to_ts is not None:
        for name, value in (("from_ts", rng.from_ts), ("to_ts", rng.to_ts)):
            if value is None:
                raise validation_error(f"range.{name} is required", f"$.range.{name}")
            if parse_rfc3339(value) is None:
                raise validation_error(f"range.{name} must be an RFC 3339 timestamp", f"$.range.{name}")
        start, end = parse_rfc3339(str(rng.from_ts)), parse_rfc3339(str(rng.to_ts))
        if start is None or end is None or start > end:
            raise validation_error("range.from_ts is after range.to_ts", "$.range.to_ts")
        return {"from_ts": rng.from_ts, "to_ts": rng.to_ts}
    if rng.from_seq is None and rng.to_seq is None:
        raise validation_error("range needs {from_ts, to_ts} or {from_seq, to_seq}", "$.range")
    for name, number in (("from_seq", rng.from_seq), ("to_seq", rng.to_seq)):
        if number is None:
            raise validation_error(f"range.{name} is required", f"$.range.{name}")
        if not 0 <= number <= INDEX_MAX:
            raise validation_error(f"range.{name} must be a log index >= 0", f"$.range.{name}")
    if int(rng.from_seq or 0) > int(rng.to_seq or 0):
        raise validation_error("range.from_seq is after range.to_seq", "$.range.to_seq")
    return {"from_seq": rng.from_seq, "to_seq": rng.to_seq}


def _decode_request(body: bytes) -> ProofRequestIn:
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None


async def generate(request: web.Request) -> web.Response:
    """POST /proofs/generate (and POST /finance/verify): start generating; {ok, proof_id, status}.

    Idempotent per principal by `request_id` (or the `Idempotency-Key` header when `request_id` is
    absent): the same request answers the same proof; a different body -> 409 IDEMPOTENCY_CONFLICT.
    """
    svc = services(request)
    body = _decode_request(await json_body(request))
    rng = _validated_range(body.range)
    request_id = body.request_id
    if request_id is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(request_id):
        raise validation_error("request_id must be 1-200 printable ASCII characters", "$.request_id")
    if request_id is None:
        request_id = idempotency_key(request)
    if svc.signer is None:
        raise LedgerError(ErrorCode.SIGNING_FAILURE, "signing is not configured on this node", {})
    work = runner(request.app)
    await work.recover(svc)
    who = principal(request).name
    stored = msgspec.json.encode({"range": rng, "caller": body.caller}).decode()
    proof_id = f"proof-{uuid.uuid4().hex}"
    async with svc.pool.acquire() as conn:
        created = await conn.fetchval(
            "INSERT INTO proofs (proof_id, request_id, principal, request, status) "
            "VALUES ($1, $2, $3, $4::jsonb, 'generating') "
            "ON CONFLICT (principal, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING proof_id",
            proof_id,
            request_id,
            who,
            stored,
        )
        if created is None:
            existing = await conn.fetchrow(
                "SELECT proof_id, request::text AS request, status FROM proofs "
                "WHERE principal = $1 AND request_id = $2",
                who,
                request_id,
            )
    if created is not None:
        work.start(svc, proof_id, rng)
        await audit_event(
            request, "proof.generate", {"proof_id": proof_id, "range": rng, "request_id": request_id}
        )
        return _started(proof_id, "generating")
    if existing is None:  # deleted between the two statements: vanishingly rare
        raise LedgerError(ErrorCode.SERVICE_UNAVAILABLE, "proof request raced; retry", {})
    if msgspec.json.decode(existing["request"]) != msgspec.json.decode(stored):
        raise LedgerError(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "request_id already used with a different request",
            {"request_id": request_id, "proof_id": existing["proof_id"]},
        )
    return _started(existing["proof_id"], existing["status"])


def _started(proof_id: str, status: str) -> web.Response:
    """`{ok: true, proof_id, status}` (`status` is a body field here, so not through `ok()`)."""
    body = {"ok": True, "proof_id": proof_id, "status": status}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def _not_found(proof_id: str) -> LedgerError:
    return LedgerError(
        ErrorCode.PROOF_NOT_FOUND, f"no proof {proof_id}", {"resource": "proof", "id": proof_id}
    )


async def get_proof(request: web.Request) -> web.Response:
    """GET /proofs/{proof_id}: status, range and (when ready) the package hash and its checkpoint."""
    svc = services(request)
    proof_id = request.match_info["proof_id"]
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT proof_id, request::text AS request, status, created_at, ready_at, package, "
            "package_hash, error FROM proofs WHERE proof_id = $1",
            proof_id,
        )
    if row is None:
        raise _not_found(proof_id)
    stored = msgspec.json.decode(row["request"])
    proof: dict[str, Any] = {
        "proof_id": row["proof_id"],
        "status": row["status"],
        "range": stored.get("range"),
        "created_at": rfc3339(row["created_at"]),
        "hash": None,
        "signer_kid": None,
        "signature": None,
        "ts": None,
        "signer": None,
        "checkpoint": None,
    }
    if row["status"] == "ready" and row["package"] is not None:
        head = _head_decoder.decode(bytes(row["package"])).checkpoint
        statement = head.statement
        proof.update(
            hash=bytes(row["package_hash"]).hex(),
            signer_kid=statement.get("signer_kid"),
            signature=head.signature,
            ts=statement.get("timestamp"),
            signer=statement.get("signer"),
            checkpoint={"tree_size": statement.get("tree_size"), "root": statement.get("root")},
            ready_at=rfc3339(row["ready_at"]) if row["ready_at"] else None,
        )
    elif row["status"] == "failed":
        proof["error"] = _error_dict(row["error"])
    return ok(proof=proof)


async def get_package(request: web.Request) -> web.Response:
    """GET /proofs/{proof_id}/package: the canonical package bytes as a JSON attachment."""
    svc = services(request)
    proof_id = request.match_info["proof_id"]
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT status, package FROM proofs WHERE proof_id = $1", proof_id)
    if row is None:
        raise _not_found(proof_id)
    if row["status"] != "ready" or row["package"] is None:
        raise LedgerError(
            ErrorCode.INVALID_STATE,
            f"proof {proof_id} is not ready",
            {"proof_id": proof_id, "status": row["status"]},
        )
    return web.Response(
        body=bytes(row["package"]),
        content_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{proof_id}.json"'},
    )


def _query_size(request: web.Request, name: str) -> int:
    value = request.query.get(name)
    if value is None or value == "":
        raise validation_error(f"{name} is required (a checkpoint tree size)", name)
    try:
        number = int(value)
    except ValueError:
        raise validation_error(f"{name} must be an integer tree size", name) from None
    if not 1 <= number <= INDEX_MAX:
        raise validation_error(f"{name} must be a tree size >= 1", name)
    return number


async def get_consistency(request: web.Request) -> web.Response:
    """GET /proofs/consistency?from=N&to=M: both signed checkpoints and the RFC 9162 proof N -> M."""
    svc = services(request)
    old_size, new_size = _query_size(request, "from"), _query_size(request, "to")
    if old_size > new_size:
        raise validation_error("from must not be greater than to", "from")
    if svc.signer is None:
        raise LedgerError(ErrorCode.SIGNING_FAILURE, "signing is not configured on this node", {})
    async with svc.pool.acquire() as conn:
        answer = await proof_store.consistency(conn, svc.signer, old_size, new_size)
    return ok(**answer)


async def proofs_health(request: web.Request) -> web.Response:
    """GET /health/proofs: proof generation (pending, last ready, failures) and the signed layer:
    the signer backend (an HSM, or a loudly labelled software key), each shard's newest signed batch
    with its age, and the latest checkpoint with its age and a fresh check of its signature."""
    svc = services(request)
    await runner(request.app).recover(svc)
    now = datetime.now(UTC)
    async with svc.pool.acquire() as conn:
        counts = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'generating') AS pending, "
            "count(*) FILTER (WHERE status = 'failed') AS failed, "
            "max(ready_at) FILTER (WHERE status = 'ready') AS last_ready FROM proofs"
        )
        checkpoint = await signing_health.latest_checkpoint_health(conn, now)
        shards = await signing_health.latest_batches(conn, sorted(svc.shards), now)
        unlogged = await signing_health.unlogged_batches(conn)
    problems = []
    if checkpoint is not None and not checkpoint["signature_verified"]:
        problems.append(f"checkpoint {checkpoint['tree_size']}: signature does not verify")
    signer: dict[str, Any] = {"backend": svc.signer_kind, "hsm": svc.signer_kind == "pkcs11"}
    if svc.signer_kind in SIGNER_WARNINGS:
        signer["warning"] = SIGNER_WARNINGS[svc.signer_kind]
    return ok(
        pending=counts["pending"],
        last_proof_ts=rfc3339(counts["last_ready"]) if counts["last_ready"] else None,
        failed_count=counts["failed"],
        last_checkpoint=checkpoint,
        signer=signer,
        shards=shards,
        unlogged_batches=unlogged,
        problems=problems,
    )


# `/proofs/consistency` must come before `/proofs/{proof_id}` (aiohttp matches in order).
ROUTES: Final = [
    ("POST", "/proofs/generate", generate, GENERATORS),
    ("POST", "/finance/verify", generate, GENERATORS),
    ("GET", "/proofs/consistency", get_consistency, READERS),
    ("GET", "/proofs/{proof_id}", get_proof, READERS),
    ("GET", "/proofs/{proof_id}/package", get_package, READERS),
    ("GET", "/health/proofs", proofs_health, OPERATORS),
]
