"""The backup and restore drill (issue 9 item 7), end to end, as an operator runs it.

A real node (shared PostgreSQL, Ray, HTTP) takes single-shard and cross-shard journals and holds
(posted, voided, open); `ledger-node backup` runs while more traffic flows; `ledger-node restore`
loads the archive into a fresh database, replays and verifies it, and a node then serves from the
restored database. The drill must FAIL when a journal in the backup is altered: an edited dump
that no longer matches the manifest is refused outright, and one whose manifest was rewritten to
match is loaded, then refused by the verification, which names the journal.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.test_errors import Client, expect_ok, on_shard
from tests.support.databases import create_database, drop_database
from tests.support.node import NodeHarness, check_store, journal

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
TARGET = "bk-single-5"  # the journal the tampering tests alter (amount 105)


def ledger_node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ledger-node ARGS` as a subprocess of this checkout (no DATABASE_URL / LEDGER_* inherited)."""
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("LEDGER_")}
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=REPO, env={**base, **(env or {})}, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


async def _traffic(c: Client) -> None:
    """Single-shard journals on every shard, cross-shard journals, and holds posted, voided and open."""
    for n in range(12):
        shard = n % 4
        debit, credit = on_shard(f"asset:bk-cash{shard}", shard), on_shard(f"revenue:bk-sales{shard}", shard)
        expect_ok(await c.post(journal(f"bk-single-{n}", debit, credit, 100 + n)))
    for n in range(6):
        debit, credit = on_shard("asset:bk-xa", n % 4), on_shard("liability:bk-xb", (n + 1) % 4)
        expect_ok(await c.post(journal(f"bk-cross-{n}", debit, credit, 1000 + n)))
    wallet, merchant = on_shard("liability:bk-wallet", 2), on_shard("liability:bk-merchant", 2)
    expect_ok(await c.create_account(wallet, no_negative=True), 201)
    expect_ok(await c.post(journal("bk-fund", on_shard("asset:bk-bank", 2), wallet, 5000)))
    for hold in ("bk-hold-post", "bk-hold-void", "bk-hold-open"):
        expect_ok(await c.call("POST", "/ledger/holds", body=journal(hold, wallet, merchant, 700)))
    expect_ok(await c.call("POST", "/ledger/holds/bk-hold-post/post", body={"amount_cents": 500}))
    expect_ok(await c.call("POST", "/ledger/holds/bk-hold-void/void"))


def _client_run(url: str, flow: Callable[[Client], Any]) -> Any:
    async def main() -> Any:
        async with aiohttp.ClientSession() as http:
            return await flow(Client(http, url))

    return asyncio.run(main())


async def _fetch(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _wait_checkpointed(dsn: str) -> None:
    for _ in range(100):
        if await _fetch(dsn, "SELECT count(*) FROM batches WHERE log_index IS NULL") == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the signer never checkpointed the batches")


class Drill:
    """The node, its public key file and one backup taken under traffic."""

    def __init__(self, node: NodeHarness, backup: Path, public_key: Path, snapshot_journals: int) -> None:
        self.node, self.backup, self.public_key, self.snapshot_journals = (
            node,
            backup,
            public_key,
            snapshot_journals,
        )


@pytest.fixture(scope="module")
def drill(node: NodeHarness, tmp_path_factory: pytest.TempPathFactory) -> Drill:
    """Traffic, a checkpoint, then a backup taken while a second client keeps posting."""
    work = tmp_path_factory.mktemp("drill")
    _client_run(node.url, _traffic)
    node.run(_wait_checkpointed(node.dsn))
    keys = _client_run(node.url, lambda c: c.call("GET", "/keys", role="auditor"))
    public_key = work / "pub.pem"
    public_key.write_text(expect_ok(keys)["keys"][0]["pem"])

    stop = threading.Event()

    async def more(c: Client) -> None:
        n = 0
        while not stop.is_set():
            expect_ok(await c.post(journal(f"bk-during-{n}", "asset:bk-during", "revenue:bk-during", 7)))
            n += 1

    poster = threading.Thread(target=_client_run, args=(node.url, more))
    poster.start()
    try:
        backup = work / "ledger.backup"
        done = ledger_node("backup", "--out", str(backup), "--database-url", node.dsn)
    finally:
        stop.set()
        poster.join(60)
    assert done.returncode == 0, done.stderr
    assert "backup written" in done.stdout and "pg_dump" in done.stderr, (done.stdout, done.stderr)
    with tarfile.open(backup) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert b"BEGIN PRIVATE KEY" not in tar.extractfile("keys.json").read()  # type: ignore[union-attr]
    return Drill(node, backup, public_key, manifest["counts"]["journals"])


@pytest.fixture
def empty_db() -> Iterator[str]:
    """A fresh, empty database on the shared PostgreSQL; dropped after."""
    dsn = asyncio.run(create_database("ledger_restore"))
    yield dsn
    asyncio.run(drop_database(dsn))


def _rewrite(
    src: Path, dst: Path, table: str, edit: Callable[[dict[str, str]], None], fix_manifest: bool
) -> None:
    """Copy a backup, applying `edit` to the row of `table` whose journal_id is TARGET (and line_no 0)."""
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    sql = gzip.decompress(members["database.sql.gz"]).decode()
    out, columns, edited = [], None, 0
    for text in sql.split("\n"):
        line = text
        if line.startswith(f"COPY public.{table} ("):
            columns = [c.strip() for c in line[line.index("(") + 1 : line.index(")")].split(",")]
        elif columns is not None and line == "\\.":
            columns = None
        elif columns is not None:
            row = dict(zip(columns, line.split("\t"), strict=True))
            if row["journal_id"] == TARGET and row.get("line_no", "0") == "0":
                edit(row)
                line = "\t".join(row[c] for c in columns)
                edited += 1
        out.append(line)
    assert edited == 1, f"{TARGET} not found in {table}"
    members["database.sql.gz"] = gzip.compress("\n".join(out).encode())
    if fix_manifest:
        manifest = json.loads(members["manifest.json"])
        manifest["files"]["database.sql.gz"]["sha256"] = hashlib.sha256(
            members["database.sql.gz"]
        ).hexdigest()
        members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(dst, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _alter_body_amount(row: dict[str, str]) -> None:
    body = bytes.fromhex(row["body"].removeprefix("\\\\x"))
    assert body.count(b'"amount_cents":105') == 2, body
    row["body"] = "\\\\x" + body.replace(b'"amount_cents":105', b'"amount_cents":905').hex()


def test_drill_restores_verifies_and_the_node_serves(drill: Drill, empty_db: str) -> None:
    """Tried: back up a node under traffic, restore into a fresh database with the node's public key
    trusted -> exit 0, "restore verified" with the snapshot's journal count, chains and open holds;
    `ledger-node check` passes on it; a node started on the restored database serves the old
    journals (and their holds) and takes new ones, and check still passes after."""
    done = ledger_node(
        "restore", str(drill.backup), "--database-url", empty_db, "--public-key", str(drill.public_key)
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "restore verified" in done.stdout, done.stdout
    assert f"{drill.snapshot_journals} journals" in done.stdout, done.stdout
    assert "1 open_holds" in done.stdout and "4 chains" in done.stdout, done.stdout
    assert "0 changed" in done.stdout, done.stdout
    for step in ("manifest ok", "restore: loaded", "replay: comparing", "replay: rebuilding"):
        assert step in done.stderr, done.stderr
    checked = ledger_node("check", env={"DATABASE_URL": empty_db})
    assert checked.returncode == 0, checked.stdout

    restored = NodeHarness(database_url=empty_db).start()
    try:

        async def flow(c: Client) -> None:
            old = expect_ok(await c.call("GET", f"/ledger/{TARGET}", role="auditor"))
            assert [e["amount_cents"] for e in old["journal"]["entries"]] == [105, 105]
            hold = expect_ok(await c.call("GET", "/ledger/holds/bk-hold-open", role="auditor"))
            assert hold["hold"]["state"] == "pending"
            expect_ok(await c.call("POST", "/ledger/holds/bk-hold-open/void"))
            expect_ok(await c.post(journal("bk-after-restore", "asset:bk-after", "revenue:bk-after", 11)))
            expect_ok(await c.post(journal(None, on_shard("asset:bk-xa", 0), on_shard("asset:bk-xa", 3), 3)))

        _client_run(restored.url, flow)
        assert restored.run(check_store(empty_db)) == []
    finally:
        restored.database_url = None
        restored.dsn = ""  # the fixture drops the database
        restored.stop()


def test_restore_refuses_a_database_that_is_not_empty(drill: Drill) -> None:
    """Tried: restore into the live node's own database -> exit 1, "is not empty", and nothing
    in it changed (same journal count)."""
    before = drill.node.run(_fetch(drill.node.dsn, "SELECT count(*) FROM journals"))
    done = ledger_node("restore", str(drill.backup), "--database-url", drill.node.dsn)
    assert done.returncode == 1
    assert "is not empty" in done.stderr and "restore only into an empty database" in done.stderr, done.stderr
    assert drill.node.run(_fetch(drill.node.dsn, "SELECT count(*) FROM journals")) >= before


def test_altered_dump_not_matching_the_manifest_is_refused(
    drill: Drill, empty_db: str, tmp_path: Path
) -> None:
    """Tried: change the amount inside a journal's body in the dump, leave the manifest -> exit 1,
    "does not match the manifest", and the target database stays empty."""
    altered = tmp_path / "altered.backup"
    _rewrite(drill.backup, altered, "journals", _alter_body_amount, fix_manifest=False)
    done = ledger_node("restore", str(altered), "--database-url", empty_db)
    assert done.returncode == 1
    assert "database.sql.gz does not match the manifest" in done.stderr, done.stderr
    assert asyncio.run(_fetch(empty_db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")) == 0


def test_altered_journal_body_fails_verification_naming_it(
    drill: Drill, empty_db: str, tmp_path: Path
) -> None:
    """Tried: change the amount inside a journal's body and rewrite the manifest's SHA-256 to match
    -> the dump loads, and the verification fails (exit 1) naming the journal: its hash no longer
    matches its body, and its lines no longer match its body."""
    altered = tmp_path / "altered.backup"
    _rewrite(drill.backup, altered, "journals", _alter_body_amount, fix_manifest=True)
    done = ledger_node("restore", str(altered), "--database-url", empty_db)
    assert done.returncode == 1, done.stdout
    assert f"hash_mismatch: {TARGET}" in done.stdout, done.stdout
    assert f"lines_differ_from_body: {TARGET}" in done.stdout, done.stdout
    assert "restore FAILED verification" in done.stdout and "restore verified" not in done.stdout


def test_altered_line_amount_fails_verification_naming_the_journal(
    drill: Drill, empty_db: str, tmp_path: Path
) -> None:
    """Tried: change one stored line amount of a journal (its body and hash untouched) with a matching
    manifest -> exit 1, naming the journal (lines differ from the signed body) and the balance it
    skews; balances are not rebuilt from the forged line."""
    altered = tmp_path / "altered-line.backup"

    def edit(row: dict[str, str]) -> None:
        assert row["amount"] == "105", row
        row["amount"] = "905"

    _rewrite(drill.backup, altered, "journal_lines", edit, fix_manifest=True)
    done = ledger_node("restore", str(altered), "--database-url", empty_db)
    assert done.returncode == 1, done.stdout
    assert f"lines_differ_from_body: {TARGET}" in done.stdout, done.stdout
    assert f"unbalanced_journal: {TARGET}" in done.stdout, done.stdout
    assert "balances rebuilt" not in done.stdout
