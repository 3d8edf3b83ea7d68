"""The OpenAPI 3 document of the node, served at `GET /openapi.json` (public, DECISIONS D5).

Built from the application's own route table (every route the router knows, with the roles
`create_app` gave it) and from the msgspec request types the handlers decode
(`msgspec.json.schema_components`), so it cannot drift from the code: a route without an entry in
`REQUEST_BODIES` is still documented (with a generic JSON body when it is a POST), and a test
asserts that every router route appears. Every error response is the envelope
`{ok: false, error: {code, message, details}}` with `code` one of `ErrorCode`; success responses
are `{ok: true, ...}` unless `SUCCESS_CONTENT` says the route answers something else (CSV, PDF,
the proof package itself, console files, Prometheus text).
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec
from aiohttp import web

from api import approval_routes, finance_routes, fx_routes, hold_routes, reconcile_routes, royalty_routes
from api.auth import PUBLIC, Role
from api.ledger_routes import AccountIn
from api.proof_routes import ProofRequestIn
from finance import escrow, payouts, reconcile_service, royalties, service
from ledger.errors import ErrorCode
from ledger.journal import JournalIn

OPENAPI_VERSION: Final = "3.1.0"  # JSON Schema 2020-12, what msgspec generates
REF_TEMPLATE: Final = "#/components/schemas/{name}"


class ErrorBody(msgspec.Struct):
    """The `error` member of an error envelope."""

    code: ErrorCode
    message: str
    details: dict[str, Any]


class ErrorEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    """Every error answer of the node."""

    ok: Literal[False]
    error: ErrorBody


class OkEnvelope(msgspec.Struct):
    """A success answer: `ok: true` plus the route's fields."""

    ok: Literal[True]


class PostBatchBody(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /ledger/post_batch` body (the handler decodes each journal on its own)."""

    journals: list[JournalIn]


# (method, path) -> (request type, body required). A POST missing here gets a generic JSON body.
REQUEST_BODIES: Final[dict[tuple[str, str], tuple[Any, bool]]] = {
    ("POST", "/ledger/post"): (JournalIn, True),
    ("POST", "/ledger/post_batch"): (PostBatchBody, True),
    ("POST", "/accounts"): (AccountIn, True),
    ("POST", "/ledger/holds"): (hold_routes.HoldIn, True),
    ("POST", "/ledger/holds/{hold_id}/post"): (hold_routes.HoldPostIn, False),
    ("POST", "/proofs/generate"): (ProofRequestIn, True),
    ("POST", "/finance/verify"): (ProofRequestIn, True),
    ("POST", "/admin/approvers"): (approval_routes.ApproverIn, True),
    ("POST", "/finance/approvals/{action_id}"): (approval_routes.ApprovalIn, True),
    ("POST", "/finance/approvals/{action_id}/reject"): (approval_routes.RejectIn, False),
    ("POST", "/finance/journal"): (approval_routes.AdjustingJournalIn, True),
    ("POST", "/finance/allocate_escrow"): (escrow.AllocateRequest, True),
    ("POST", "/finance/release_escrow"): (escrow.ReleaseRequest, True),
    ("POST", "/finance/cancel_escrow"): (escrow.CancelRequest, True),
    ("POST", "/finance/invoice"): (service.InvoiceRequest, True),
    ("POST", "/finance/invoice/{invoice_id}/issue"): (finance_routes.EmptyRequest, False),
    ("POST", "/finance/invoice/{invoice_id}/void"): (finance_routes.EmptyRequest, False),
    ("POST", "/finance/invoice/{invoice_id}/close"): (finance_routes.EmptyRequest, False),
    ("POST", "/finance/payment"): (service.PaymentRequest, True),
    ("POST", "/finance/fulfill"): (finance_routes.FulfilRequest, True),
    ("POST", "/finance/refund"): (service.RefundRequest, True),
    ("POST", "/finance/recognition/run"): (finance_routes.RecognitionRunRequest, False),
    ("POST", "/settlement"): (finance_routes.SettlementRequest, True),
    ("POST", "/invoices"): (service.ExternalInvoiceRequest, True),
    ("POST", "/finance/fx/rates"): (fx_routes.RatesIn, True),
    ("POST", "/finance/payout/run"): (payouts.RunRequest, True),
    ("POST", "/reconcile"): (reconcile_service.RunRequest, True),
    ("POST", "/reconcile/{reconcile_id}/resolve"): (reconcile_routes.ResolveIn, True),
    ("POST", "/finance/participants"): (royalties.ParticipantRequest, True),
    ("POST", "/finance/royalty_rules"): (royalties.RuleRequest, True),
    ("POST", "/finance/holdbacks/release"): (royalty_routes.HoldbackReleaseRequest, False),
}

_STRING: Final = {"type": "string"}
_INTEGER: Final = {"type": "integer"}
# Query parameters of the routes that take them (all optional).
QUERY_PARAMETERS: Final[dict[tuple[str, str], dict[str, dict[str, Any]]]] = {
    ("GET", "/finance/ledger/journal"): {
        "limit": _INTEGER, "cursor": _STRING, "from_ts": _STRING, "to_ts": _STRING, "account_id": _STRING,
    },
    ("GET", "/accounts/{account_id}/balances"): {"as_of": _STRING},
    ("GET", "/finance/approvals"): {"status": _STRING, "limit": _INTEGER},
}  # fmt: skip

_ANY_JSON: Final[dict[str, Any]] = {"schema": {}}
_TEXT: Final = {"schema": {"type": "string"}}
_BINARY: Final = {"schema": {"type": "string", "format": "binary"}}
_CSV_OR_ENVELOPE: Final = {"application/json": {"$ref": "OkEnvelope"}, "text/csv": _TEXT}
# Routes whose success is not (only) the JSON envelope: media type -> content ("$ref": OkEnvelope).
SUCCESS_CONTENT: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("GET", "/metrics"): {"text/plain": _TEXT},
    ("GET", "/openapi.json"): {"application/json": _ANY_JSON},
    ("GET", "/console"): {"text/html": _TEXT},
    ("GET", "/console/{path}"): {
        "text/html": _TEXT, "text/javascript": _TEXT, "text/css": _TEXT, "application/javascript": _TEXT,
        "text/plain": _TEXT, "text/markdown": _TEXT, "image/svg+xml": _TEXT,
    },
    ("GET", "/proofs/{proof_id}/package"): {"application/json": _ANY_JSON},
    ("GET", "/finance/exports/journal.csv"): {"text/csv": _TEXT},
    ("GET", "/finance/invoice/{invoice_id}.pdf"): {"application/pdf": _BINARY},
    ("GET", "/finance/payout/batches/{batch_id}/file"): {"text/csv": _TEXT},
    ("GET", "/finance/reports/{name}"): _CSV_OR_ENVELOPE,
    ("GET", "/reconcile/{reconcile_id}"): _CSV_OR_ENVELOPE,
    ("GET", "/finance/tax/return/{period}"): _CSV_OR_ENVELOPE,
}  # fmt: skip

_PARAMETER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=name)}


def _success(key: tuple[str, str]) -> dict[str, Any]:
    content = SUCCESS_CONTENT.get(key, {"application/json": {"$ref": "OkEnvelope"}})
    resolved = {
        media: {"schema": _ref("OkEnvelope")} if body.get("$ref") == "OkEnvelope" else body
        for media, body in content.items()
    }
    return {"description": "success", "content": resolved}


def _operation(
    method: str, path: str, roles: frozenset[Role] | None, bodies: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    key = (method, path)
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()} {path}",
        "responses": {
            "2XX": _success(key),
            "default": {
                "description": "error envelope",
                "content": {"application/json": {"schema": _ref("ErrorEnvelope")}},
            },
        },
    }
    if path == "/console":
        operation["responses"]["3XX"] = {"description": "redirect to /console/"}
    if roles is None or roles == PUBLIC:
        operation["security"] = []
    else:
        operation["description"] = "roles: " + ", ".join(sorted(str(r) for r in roles))
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in _PARAMETER.findall(path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in QUERY_PARAMETERS.get(key, {}).items()
    ]
    if parameters:
        operation["parameters"] = parameters
    if key in bodies:
        operation["requestBody"] = bodies[key]
    elif method in {"POST", "PUT", "PATCH"}:
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": {}}}}
    return operation


def _request_bodies() -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    """Request body objects per route and the schema components (one `schema_components` call)."""
    keys = list(REQUEST_BODIES)
    types = [REQUEST_BODIES[k][0] for k in keys]
    refs, components = msgspec.json.schema_components(
        [*types, ErrorEnvelope, OkEnvelope], ref_template=REF_TEMPLATE
    )
    bodies = {
        key: {"required": REQUEST_BODIES[key][1], "content": {"application/json": {"schema": ref}}}
        for key, ref in zip(keys, refs, strict=False)
    }
    return bodies, components


def openapi_path(canonical: str) -> str:
    """An aiohttp route path as an OpenAPI path template (`{path:.*}` -> `{path}`)."""
    return _PARAMETER.sub(lambda m: "{" + m.group(1) + "}", canonical)


def build_document(app: web.Application, roles: dict[Any, frozenset[Role]]) -> dict[str, Any]:
    """The OpenAPI document of `app`'s routes (`roles`: handler -> roles allowed, as in create_app)."""
    bodies, components = _request_bodies()
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = openapi_path(route.resource.canonical if route.resource is not None else "")
        method = route.method.upper()
        paths.setdefault(path, {})[method.lower()] = _operation(
            method, path, roles.get(route.handler), bodies
        )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Ledger Node",
            "version": "1",
            "description": "Double-entry ledger API; see docs/api.md. Every error is the envelope "
            "{ok: false, error: {code, message, details}}.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


DOCUMENT: Final = web.AppKey("openapi_document", bytes)


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3 document (public), built once per application."""
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


def install(app: web.Application, roles: dict[Any, frozenset[Role]]) -> None:
    """Build the document once the route table is complete (call last in create_app)."""
    app[DOCUMENT] = msgspec.json.encode(build_document(app, roles))
