"""Timestamp formatting: RFC 3339, UTC, microseconds, `Z` suffix (the clock itself is passed in)."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """`2026-11-22T00:41:01.123456Z` for an aware datetime."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime | None:
    """An aware datetime from RFC 3339 text, or None if malformed or naive."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
