"""The auditor exporter: build a package for a range, sign its manifest, publish it, record it.

`AuditExporter.export` runs one export to the end (the HTTP call waits for it): it claims the export
row (a replay with the same parameters answers the stored export; other parameters are 409
IDEMPOTENCY_CONFLICT; a failed export runs again), builds the proof package first (which may force a
checkpoint), then writes every data file from one REPEATABLE READ snapshot into a staging directory,
renders the invoice PDFs, signs the manifest with the node's signer key (the signer actor, like a
checkpoint) and publishes the staged package (`finance/export_destinations.py`). Only then is the row
`completed`; any failure marks it `failed` and answers 500 AUDIT_EXPORT_ERROR, with nothing reported.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from finance import audit_export as pure
from finance.export_destinations import (
    Destination,
    ExportDestinationError,
    ExportSettings,
    destination_for,
    new_staging_dir,
    package_files,
)
from finance.invoice_pdf import SellerDetails, render_invoice
from finance.service import invoice_view
from ledger.errors import ErrorCode, LedgerError
from ledger.timestamps import rfc3339
from signer.export_verify import MANIFEST_FILE
from signer.package import b64
from store import export_repo, finance_repo
from store.proofs import ProofSigner, build_proof_package

log = logging.getLogger(__name__)

ProgressHook = Callable[[str, int], None]
MAX_EXPORTS: Final = 2


class ExportSigner(ProofSigner, Protocol):
    """The signer calls an export makes: proofs, plus signing the manifest statement."""

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]: ...


def export_error(message: str, export_id: str, reason: str | None = None) -> LedgerError:
    """The 500 AUDIT_EXPORT_ERROR of a failed export."""
    details: dict[str, Any] = {"export_id": export_id}
    if reason:
        details["reason"] = reason
    return LedgerError(ErrorCode.AUDIT_EXPORT_ERROR, message, details)


def export_view(row: asyncpg.Record) -> dict[str, Any]:
    """`GET /exports/{id}`: status, request, destination, location, files with hashes, manifest."""
    request = msgspec.json.decode(row["request"])
    location = row["location"]
    view: dict[str, Any] = {
        "export_id": row["export_id"],
        "status": row["status"],
        "from_ts": request["from_ts"],
        "to_ts": request["to_ts"],
        "pii_included": request["pii_included"],
        "destination": row["destination"],
        "location": location,
        "s3_path": location if location and location.startswith("s3://") else None,
        "attempt": row["attempt"],
        "created_at": rfc3339(row["created_at"]),
        "completed_at": rfc3339(row["completed_at"]) if row["completed_at"] else None,
        "files": msgspec.json.decode(row["files"]) if row["files"] else None,
        "manifest": msgspec.json.decode(row["manifest"]) if row["manifest"] else None,
    }
    if row["error"]:
        view["error"] = msgspec.json.decode(row["error"])
    return view


class AuditExporter:
    """The node's exporter (module docstring). `settings` may be replaced at run time (tests)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        signer: ExportSigner | None,
        settings: ExportSettings,
        seller: SellerDetails,
        signer_kind: str = "none",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.signer = signer
        self.settings = settings
        self.seller = seller
        self.signer_kind = signer_kind
        self.clock = clock
        self.gate = asyncio.Semaphore(MAX_EXPORTS)
        self.running: set[str] = set()
        self.started = clock()
        self.recovered = False

    def _signer(self) -> ExportSigner:
        if self.signer is None:
            raise LedgerError(ErrorCode.SIGNING_FAILURE, "signing is not configured on this node", {})
        return self.signer

    def destination(self) -> Destination:
        """The configured destination."""
        return destination_for(self.settings)

    async def _recover(self) -> None:
        if self.recovered:
            return
        self.recovered = True
        error = export_error("interrupted: the node restarted while exporting", "*").as_dict()
        async with self.pool.acquire() as conn:
            await export_repo.fail_interrupted(conn, self.started, error)

    async def export(
        self, request: pure.ExportRequest, principal: str, progress: ProgressHook | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Run (or replay) one export: (the stored view of the completed export, whether it ran now)."""
        checked = pure.check_request(request, self.clock())
        self._signer()
        await self._recover()
        export_id = checked.export_id
        destination = self.destination()
        async with self.pool.acquire() as conn:
            row, run_it = await export_repo.claim(
                conn, export_id, principal, checked.parameters(), destination.kind
            )
        if msgspec.json.decode(row["request"]) != checked.parameters():
            raise LedgerError(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "request_id already used for an export with different parameters",
                {"request_id": export_id, "export_id": export_id},
            )
        if not run_it:
            if row["status"] == "running":
                raise LedgerError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    f"export {export_id} is still running; retry",
                    {"export_id": export_id, "retryable": True},
                )
            return export_view(row), False
        self.running.add(export_id)
        try:
            async with self.gate:
                await self._run(checked, destination, progress)
        except Exception as exc:
            error = self._as_error(export_id, exc)
            async with self.pool.acquire() as conn:
                await export_repo.fail(conn, export_id, error.as_dict())
            raise error from exc
        finally:
            self.running.discard(export_id)
        return await self.view(export_id), True

    def _as_error(self, export_id: str, exc: Exception) -> LedgerError:
        if isinstance(exc, LedgerError) and exc.code is ErrorCode.AUDIT_EXPORT_ERROR:
            return exc
        if isinstance(exc, ExportDestinationError):
            log.error("export %s: %s", export_id, exc)
            return export_error(f"export could not be published: {exc}", export_id, "destination")
        if isinstance(exc, LedgerError):
            return export_error(f"export failed: {exc.message}", export_id, str(exc.code))
        log.error("export %s failed", export_id, exc_info=exc)
        return export_error("export failed", export_id, type(exc).__name__)

    async def _run(
        self, checked: pure.CheckedRequest, destination: Destination, progress: ProgressHook | None
    ) -> None:
        export_id = checked.export_id
        staged = new_staging_dir(self.settings, export_id)
        try:
            ts = rfc3339(self.clock())
            checkpoint = await self._proofs(checked, staged, ts)
            counts = await self._data(checked, staged, progress)
            files = {
                name: pure.file_entry((staged / name).read_bytes(), counts.get(name))
                for name in package_files(staged)
            }
            statement = pure.manifest_statement(
                export_id=export_id,
                request=checked,
                service=self.settings.service,
                env=self.settings.env,
                ts=ts,
                files=files,
                checkpoint=checkpoint,
            )
            [(signed, _kid, signature)] = await self._signer().sign_statements([statement])
            manifest = msgspec.json.decode(signed)
            (staged / MANIFEST_FILE).write_bytes(pure.manifest_document(manifest, b64(signature)))
            location = await destination.publish(export_id, staged, self.clock())
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        async with self.pool.acquire() as conn:
            await export_repo.complete(conn, export_id, location, files, manifest)

    async def _proofs(self, checked: pure.CheckedRequest, staged: Path, ts: str) -> dict[str, Any] | None:
        """Write `proofs.json` for the range; the checkpoint it rests on (None: nothing signed in range)."""
        rng = {"from_ts": checked.from_ts, "to_ts": checked.to_ts}
        try:
            async with self.pool.acquire() as conn:
                data = await build_proof_package(
                    conn,
                    self._signer(),
                    proof_id=f"{checked.export_id}.proofs",
                    generated_at=ts,
                    rng=rng,
                    signer_kind=self.signer_kind,
                )
        except LedgerError as exc:
            if exc.code is ErrorCode.VALIDATION_ERROR:  # nothing signed in the range
                return None
            raise
        (staged / pure.PROOFS_FILE).write_bytes(data)
        head = msgspec.json.decode(data)["checkpoint"]["statement"]
        return {"tree_size": head["tree_size"], "root": head["root"], "timestamp": head["timestamp"]}

    async def _data(
        self, checked: pure.CheckedRequest, staged: Path, progress: ProgressHook | None
    ) -> dict[str, int]:
        """Every `.jsonl.gz` and the invoice PDFs, from one snapshot; records per file."""
        transform = pure.policy(checked.pii_included, self.settings.pii_key)
        counts: dict[str, int] = {}
        (staged / pure.PDF_DIR).mkdir()
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            for kind in pure.DATA_FILES:
                name = f"{kind}.jsonl.gz"
                with (staged / name).open("wb") as sink:
                    writer = pure.JsonlGzWriter(sink)
                    async for row in export_repo.range_rows(conn, kind, checked.start, checked.end):
                        record = await self._record(conn, kind, row, transform, staged)
                        writer.write(record)
                        if progress is not None:
                            progress(kind, writer.records)
                    writer.close()
                counts[name] = writer.records
        return counts

    async def _record(
        self,
        conn: asyncpg.Connection,
        kind: str,
        row: asyncpg.Record,
        transform: Callable[[Any], Any],
        staged: Path,
    ) -> dict[str, Any]:
        if kind == "journals":
            return export_repo.plain(row)  # signed bodies: verbatim (module docstring of audit_export)
        if kind != "invoices":
            record: dict[str, Any] = transform(export_repo.plain(row))
            return record
        view: dict[str, Any] = transform(
            invoice_view(row, await finance_repo.money_ids(conn, "payment", row["invoice_id"]))
        )
        pdf = await asyncio.to_thread(render_invoice, view, self.seller)
        (staged / pure.pdf_name(row["invoice_id"])).write_bytes(pdf)
        return view

    async def view(self, export_id: str) -> dict[str, Any]:
        """The stored export; 404 NOT_FOUND."""
        async with self.pool.acquire() as conn:
            row = await export_repo.export_row(conn, export_id)
        if row is None:
            raise LedgerError(
                ErrorCode.NOT_FOUND, f"no export {export_id}", {"resource": "export", "id": export_id}
            )
        return export_view(row)

    async def read_file(self, export_id: str, name: str) -> bytes:
        """One file of a completed export (only names its manifest lists, plus the manifest)."""
        view = await self.view(export_id)
        if view["status"] != "completed":
            raise LedgerError(
                ErrorCode.INVALID_STATE,
                f"export {export_id} is {view['status']}",
                {"export_id": export_id, "status": view["status"]},
            )
        if name != MANIFEST_FILE and name not in (view["files"] or {}):
            raise LedgerError(
                ErrorCode.NOT_FOUND,
                f"export {export_id} has no file {name}",
                {"resource": "export_file", "id": name},
            )
        kind = "s3" if str(view["location"]).startswith("s3://") else "local"
        source = destination_for(self.settings)
        if source.kind != kind:
            raise export_error(f"export {export_id} is at {view['location']}, not configured here", export_id)
        try:
            return await source.read(export_id, name)
        except (ExportDestinationError, OSError) as exc:
            raise export_error(f"could not read {name}: {exc}", export_id, "destination") from exc
