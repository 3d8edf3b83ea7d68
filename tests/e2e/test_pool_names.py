"""Every connection the node opens names the part of the node it serves (`application_name`), and
the audit stream's large columns compress with lz4 where the server has it (migration 0025)."""

from __future__ import annotations

import asyncio

import asyncpg

from loadtests.cpu_meter import pg_group
from store.repository import create_pool
from tests.support.databases import SHARED_ADMIN_DSN
from tests.support.node import NodeHarness


def test_running_node_names_its_connections(node: NodeHarness) -> None:
    """Tried: a started 4-shard node's backends in pg_stat_activity -> its pools appear as
    ledger-api, ledger-audit, ledger-shard-0..3, ledger-coordinator and ledger-signer, and the
    benchmark meter files each under its part (shard, api, ...)."""

    async def main() -> set[str]:
        conn = await asyncpg.connect(node.dsn)
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        return {r[0] for r in rows}

    names = asyncio.run(main())
    expected = {f"ledger-shard-{n}" for n in range(4)} | {"ledger-api", "ledger-audit", "ledger-coordinator"}
    expected.add("ledger-signer")
    assert expected <= names, names
    assert {pg_group(n) for n in expected} == {
        "pg shard", "pg api", "pg audit", "pg coordinator", "pg signer"
    }  # fmt: skip
    assert pg_group("") == pg_group("psql") == pg_group("ledger-") == "pg other"


def test_pool_name_and_default() -> None:
    """Tried: a pool made with name="ledger-test" and one without a name -> application_name is
    the given name, and `ledger-node` by default."""

    async def main() -> tuple[str, str]:
        named = await create_pool(SHARED_ADMIN_DSN, 1, 1, name="ledger-test")
        unnamed = await create_pool(SHARED_ADMIN_DSN, 1, 1)
        try:
            async with named.acquire() as a, unnamed.acquire() as b:
                return (
                    await a.fetchval("SELECT current_setting('application_name')"),
                    await b.fetchval("SELECT current_setting('application_name')"),
                )
        finally:
            await named.close()
            await unnamed.close()

    assert asyncio.run(main()) == ("ledger-test", "ledger-node")


def test_audit_columns_compress_with_lz4(node: NodeHarness) -> None:
    """Tried: the migrated schema's audit_events.payload and .body on this server -> lz4 ('l') when
    the server can compress with lz4, the default otherwise (the migration must not fail there)."""

    async def main() -> tuple[bool, dict[str, str]]:
        conn = await asyncpg.connect(node.dsn)
        try:
            has_lz4 = await conn.fetchval(
                "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
            )
            rows = await conn.fetch(
                "SELECT attname, attcompression::text AS c FROM pg_attribute"
                " WHERE attrelid = 'audit_events'::regclass AND attname IN ('payload', 'body')"
            )
        finally:
            await conn.close()
        return bool(has_lz4), {r["attname"]: r["c"] for r in rows}

    has_lz4, compression = asyncio.run(main())
    assert set(compression) == {"payload", "body"}
    assert compression == ({"payload": "l", "body": "l"} if has_lz4 else {"payload": "", "body": ""})
