"""Auditor export endpoints (REQUIREMENTS A6, issue 8 item 1; docs/api.md "Auditor exports").

`POST /exports/audit` runs an export to the end and answers `{ok, export_id, status, location, s3_path,
manifest_sha256, files}`; `GET /exports/{export_id}` shows its status (running, completed, failed),
location, files with their SHA-256 and the signed manifest; `GET /exports/{export_id}/files/{name}`
returns one file of a completed export (what `ledger-node export --out` downloads). Operators,
auditors and admins only (DECISIONS D5: exports). The exporter is `finance/export_service.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from api.audit_log import audit_event
from api.auth import Role
from api.envelope import ok
from api.ledger_routes import principal
from api.report_routes import seller_of
from api.requests import decode_json, json_body
from api.services import SERVICES
from finance.audit_export import ExportRequest
from finance.export_destinations import ExportSettings, settings_from_env
from finance.export_service import AuditExporter
from signer.export_verify import MANIFEST_FILE

EXPORTERS: Final = frozenset({Role.OPERATOR, Role.AUDITOR, Role.ADMIN})
EXPORT_SETTINGS: Final = web.AppKey("export_settings", ExportSettings)
EXPORTER: Final = web.AppKey("exporter", AuditExporter)
READY_TIMEOUT_S: Final = 3.0


def exporter(app: web.Application) -> AuditExporter:
    """The application's exporter (created at start-up)."""
    return app[EXPORTER]


async def _exporter_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the exporter at start-up: `app[EXPORT_SETTINGS]` (set by the node), else the environment."""
    svc = app[SERVICES]
    settings = app.get(EXPORT_SETTINGS) or settings_from_env(os.environ, Path(".ledger-data"))
    app[EXPORTER] = AuditExporter(svc.pool, svc.signer, settings, seller_of(app), svc.signer_kind)
    yield


def install(app: web.Application) -> None:
    """Register the exporter's start-up (after `finance_routes.install`: the seller comes from it)."""
    app.cleanup_ctx.append(_exporter_ctx)


async def ready_check(app: web.Application) -> dict[str, Any] | None:
    """The export destination's readiness for `GET /ready` (None before start-up)."""
    found = app.get(EXPORTER)
    if found is None:
        return None
    try:
        return await asyncio.wait_for(found.destination().ready(), READY_TIMEOUT_S)
    except TimeoutError:
        return {"ok": False, "kind": found.settings.destination, "reason": "timeout"}


async def start_export(request: web.Request) -> web.Response:
    """POST /exports/audit: run (or replay) an export; 500 AUDIT_EXPORT_ERROR when it fails."""
    body = decode_json(await json_body(request), ExportRequest)
    work = exporter(request.app)
    view, ran = await work.export(body, principal(request).name)
    manifest_sha256 = None
    if view["manifest"] is not None and view["status"] == "completed":
        manifest_sha256 = hashlib.sha256(await work.read_file(view["export_id"], MANIFEST_FILE)).hexdigest()
    if ran:
        await audit_event(
            request,
            "export.audit",
            {
                "export_id": view["export_id"],
                "from_ts": view["from_ts"],
                "to_ts": view["to_ts"],
                "pii_included": view["pii_included"],
                "location": view["location"],
                "manifest_sha256": manifest_sha256,
            },
        )
    return ok(
        export_id=view["export_id"],
        status=view["status"],
        location=view["location"],
        s3_path=view["s3_path"],
        manifest_sha256=manifest_sha256,
        files=len(view["files"] or {}),
    )


async def get_export(request: web.Request) -> web.Response:
    """GET /exports/{export_id}: status, location, files with hashes, manifest."""
    return ok(export=await exporter(request.app).view(request.match_info["export_id"]))


async def get_export_file(request: web.Request) -> web.Response:
    """GET /exports/{export_id}/files/{name}: one file of a completed export, as stored."""
    export_id, name = request.match_info["export_id"], request.match_info["name"]
    data = await exporter(request.app).read_file(export_id, name)
    kind = "application/json" if name.endswith(".json") else "application/octet-stream"
    return web.Response(
        body=data,
        content_type="application/pdf" if name.endswith(".pdf") else kind,
        headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()},
    )


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/exports/audit", start_export, EXPORTERS),
    ("GET", "/exports/{export_id}", get_export, EXPORTERS),
    ("GET", "/exports/{export_id}/files/{name:.+}", get_export_file, EXPORTERS),
]
