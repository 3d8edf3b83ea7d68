"""The writer pools' `timestamptz` codec (store.repository): integers in, the same
datetimes out as asyncpg's own codec, for every value the node writes or reads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import asyncpg

from store.repository import SERVER_SETTINGS, create_pool, pg_microseconds
from tests.support.databases import SHARED_ADMIN_DSN

MOMENTS = [
    datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2000, 1, 1, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC),
    datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
]


def test_pooled_codec_matches_asyncpg_and_takes_integers() -> None:
    """Tried: aware datetimes (UTC, +05:30, before and after 2000), the same as integers from
    `pg_microseconds`, a naive datetime, 'infinity' and '-infinity' -> each stored value equals
    what a plain asyncpg connection stores and reads back, as the same aware UTC datetime."""

    async def main() -> None:
        plain = await asyncpg.connect(SHARED_ADMIN_DSN, server_settings=SERVER_SETTINGS)
        pool = await create_pool(SHARED_ADMIN_DSN, 1, 1, writer=True)
        try:
            async with pool.acquire() as conn:
                for moment in MOMENTS:
                    expected = await plain.fetchval("SELECT $1::timestamptz::text", moment)
                    assert await conn.fetchval("SELECT $1::timestamptz::text", moment) == expected
                    as_int = await conn.fetchval("SELECT $1::timestamptz::text", pg_microseconds(moment))
                    assert as_int == expected
                    assert await conn.fetchval("SELECT $1::timestamptz", moment) == moment
                    assert await conn.fetchval("SELECT $1::timestamptz", moment) == await plain.fetchval(
                        "SELECT $1::timestamptz", moment
                    )
                naive = datetime(2026, 3, 1, 10, 30)
                assert await conn.fetchval("SELECT $1::timestamptz::text", naive) == await plain.fetchval(
                    "SELECT $1::timestamptz::text", naive
                )
                for text in ("infinity", "-infinity"):
                    ours = await conn.fetchval(f"SELECT '{text}'::timestamptz")
                    assert ours.tzinfo is not None and ours in (
                        datetime.max.replace(tzinfo=UTC),
                        datetime.min.replace(tzinfo=UTC),
                    )
                array = await conn.fetchval(
                    "SELECT array_agg(x) FROM unnest($1::timestamptz[]) x",
                    [pg_microseconds(MOMENTS[0]), MOMENTS[1]],
                )
                assert array == [MOMENTS[0], MOMENTS[1]]
        finally:
            await pool.close()
            await plain.close()

    asyncio.run(main())
