"""Admin endpoints of the signing layer (DECISIONS D5: admin only)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from api.auth import ADMINS
from api.envelope import ok
from api.services import SERVICES
from ledger.errors import ErrorCode, LedgerError


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


ROUTES: Final = [("POST", "/admin/keys/rotate", rotate_key, ADMINS)]
