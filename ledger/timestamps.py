"""Timestamp formatting: RFC 3339, UTC, microseconds, `Z` suffix (the clock itself is passed in)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

_RFC3339: Final = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def rfc3339(moment: datetime) -> str:
    """`2026-11-22T00:41:01.123456Z` for an aware datetime."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime | None:
    """An aware datetime from RFC 3339 text (`2026-11-17T12:00:00.5Z`), or None if it is anything else.

    Only the RFC 3339 profile is accepted (not ISO week dates, basic format or naive times);
    fractions beyond microseconds are truncated.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    date, clock, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return datetime.fromisoformat(f"{date}T{clock}{fraction}{offset}")
    except ValueError:
        return None
