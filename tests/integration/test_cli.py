"""The `ledger-node` command line as an operator uses it: migrate, check, serve's start-up errors, help.

Every command runs as a subprocess of the installed script. `check` and `migrate` talk to a fresh
database on the shared PostgreSQL (DATABASE_URL); the ledger is corrupted by hand in SQL to show
that `check` finds and names what is wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from sharding.slots import slot_of
from tests.support.databases import create_database, drop_database

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ledger-node")
COMMAND_TIMEOUT_S = 120


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `ledger-node ARGS` to completion; DATABASE_URL / LEDGER_* only as given in `env`."""
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("LEDGER_")}
    return subprocess.run(
        [str(CLI), *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def sql(dsn: str, statement: str, *args: object) -> None:
    """Execute one SQL statement on `dsn`."""

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement, *args)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture
def dsn(tmp_path: Path) -> Iterator[str]:
    """A fresh database on the shared PostgreSQL, migrated with `ledger-node migrate`; dropped after."""
    created = asyncio.run(create_database("ledger_cli"))
    try:
        migrate = run_cli("migrate", "--data-dir", str(tmp_path), env={"DATABASE_URL": created})
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        assert "applied migrations: [1" in migrate.stdout
        yield created
    finally:
        asyncio.run(drop_database(created))


def check(dsn: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`ledger-node check` against `dsn`."""
    return run_cli("check", "--data-dir", str(data_dir), env={"DATABASE_URL": dsn})


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines `check` printed."""
    return [line for line in result.stdout.splitlines() if line and not line.startswith("check ")]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _body(journal_id: str) -> str:
    """A stored body; its SHA-256 is the stored hash, as the shard writes it (check recomputes it)."""
    return f'{{"journal_id":"{journal_id}","note":"written by hand"}}'


def post_by_hand(dsn: str, journal_id: str, seq: int, prev_hash: bytes | None, amount: int = 700) -> None:
    """Store a coherent single-shard journal on stream 0 (what shard 0 would write), balances included."""
    debit, credit = "asset:cli-cash", "revenue:cli-sales"
    sql(
        dsn,
        "INSERT INTO journals (journal_id, stream_id, stream_seq, posted_at, principal, request_hash, hash,"
        " prev_hash, body) VALUES ($1, 0, $2, now(), 'service:test', $3, $4, $5, $6)",
        journal_id,
        seq,
        _digest("request " + journal_id),
        _digest(_body(journal_id)),
        prev_hash,
        _body(journal_id).encode(),
    )
    sql(
        dsn,
        "INSERT INTO journal_lines (journal_id, line_no, shard_id, account_id, currency, side, amount,"
        " posted_at) VALUES ($1, 0, 0, $2, 'USD', 'D', $4, now()), ($1, 1, 0, $3, 'USD', 'C', $4, now())",
        journal_id,
        debit,
        credit,
        amount,
    )
    for account_id, kind, debits, credits in ((debit, "asset", amount, 0), (credit, "revenue", 0, amount)):
        sql(
            dsn,
            "INSERT INTO accounts (account_id, account_type, slot) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            account_id,
            kind,
            slot_of(account_id),
        )
        sql(
            dsn,
            "INSERT INTO balances (account_id, currency, slot, debits_posted, credits_posted)"
            " VALUES ($1, 'USD', $2, $3, $4) ON CONFLICT (account_id, currency) DO UPDATE SET"
            " debits_posted = balances.debits_posted + $3, credits_posted = balances.credits_posted + $4",
            account_id,
            slot_of(account_id),
            debits,
            credits,
        )


def test_check_passes_on_a_freshly_migrated_database(dsn: str, tmp_path: Path) -> None:
    result = check(dsn, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check passed: 0 journals, 0 accounts" in result.stdout
    assert not (tmp_path / "postgres").exists(), "with DATABASE_URL no embedded PostgreSQL is made"


def test_check_names_the_account_whose_stored_balance_the_lines_do_not_explain(
    dsn: str, tmp_path: Path
) -> None:
    post_by_hand(dsn, "cli-1", 1, None)
    coherent = check(dsn, tmp_path)
    assert coherent.returncode == 0, coherent.stdout + coherent.stderr
    assert "check passed: 1 journals, 2 accounts" in coherent.stdout

    sql(dsn, "UPDATE balances SET credits_posted = credits_posted + 1 WHERE account_id = 'revenue:cli-sales'")
    result = check(dsn, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = problems(result)
    assert any(p.startswith("balance_mismatch: revenue:cli-sales USD") for p in found), found
    assert not any(p.startswith("balance_mismatch: asset:cli-cash") for p in found), found
    assert "check FAILED" in result.stdout


def test_check_names_an_account_with_a_balance_but_no_lines(dsn: str, tmp_path: Path) -> None:
    ghost = "liability:cli-ghost"
    sql(dsn, "INSERT INTO accounts (account_id, account_type, slot) VALUES ($1, 'liability', $2)", ghost, 1)
    sql(
        dsn,
        "INSERT INTO balances (account_id, currency, slot, credits_posted) VALUES ($1, 'EUR', 1, 500)",
        ghost,
    )
    result = check(dsn, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = problems(result)
    assert any(p.startswith(f"balance_mismatch: {ghost} EUR") for p in found), found


def test_check_names_the_journal_that_breaks_the_chain(dsn: str, tmp_path: Path) -> None:
    post_by_hand(dsn, "cli-chain-1", 1, None)
    post_by_hand(dsn, "cli-chain-2", 2, _digest("not the hash of cli-chain-1"))
    result = check(dsn, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = problems(result)
    assert any(p.startswith("chain_break: cli-chain-2") for p in found), found
    assert not any("cli-chain-1" in p for p in found), found
    assert not any(p.startswith("balance_mismatch") for p in found), found


def test_check_names_the_lines_stored_twice(dsn: str, tmp_path: Path) -> None:
    """journal_lines has no unique key since 0004: `check` is what finds a line stored twice."""
    post_by_hand(dsn, "cli-dup-1", 1, None)
    post_by_hand(dsn, "cli-dup-2", 2, _digest(_body("cli-dup-1")))
    assert check(dsn, tmp_path).returncode == 0
    # Both lines of cli-dup-2 again, in one (balanced) statement, as a replayed COPY would add them.
    sql(
        dsn,
        "INSERT INTO journal_lines (journal_id, line_no, shard_id, account_id, currency, side, amount,"
        " posted_at) SELECT journal_id, line_no, shard_id, account_id, currency, side, amount, posted_at"
        " FROM journal_lines WHERE journal_id = 'cli-dup-2'",
    )
    result = check(dsn, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = problems(result)
    duplicates = sorted(p for p in found if p.startswith("duplicate_line"))
    assert duplicates == [
        "duplicate_line: cli-dup-2: line 0 stored 2 times",
        "duplicate_line: cli-dup-2: line 1 stored 2 times",
    ], found
    assert not any("cli-dup-1" in p for p in found), found


def test_serve_refuses_zero_shards(tmp_path: Path) -> None:
    result = run_cli("serve", "--shards", "0", "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--shards" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "nothing is started or written"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LEDGER_RECOGNITION_INTERVAL_S", "soon", "LEDGER_RECOGNITION_INTERVAL_S must be a number"),
        ("LEDGER_APPROVAL_TTL_S", "-5", "LEDGER_APPROVAL_TTL_S must be a finite number"),
        ("LEDGER_MULTISIG", "6-of-5", "LEDGER_MULTISIG"),
        ("LEDGER_APPROVAL_THRESHOLDS", "journal=lots", "LEDGER_APPROVAL_THRESHOLDS"),
    ],
)
def test_serve_with_a_malformed_setting_names_it_without_a_traceback(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    """Tried: a non-numeric recognition interval, a negative approval TTL, a 6-of-5 policy, a
    non-integer threshold -> a clean non-zero exit naming the variable, no traceback, not serving."""
    created = asyncio.run(create_database("ledger_cli"))
    try:
        env = {"DATABASE_URL": created, name: value}
        result = run_cli("serve", "--port", "0", "--shards", "1", "--data-dir", str(tmp_path), env=env)
    finally:
        asyncio.run(drop_database(created))
    output = result.stdout + result.stderr
    assert result.returncode > 0, output
    assert "Traceback" not in output
    assert expected in result.stderr, output
    assert "serving on" not in output


def test_serve_with_malformed_tokens_says_so_without_a_traceback(tmp_path: Path) -> None:
    created = asyncio.run(create_database("ledger_cli"))
    try:
        env = {"DATABASE_URL": created, "LEDGER_API_TOKENS": "garbage"}
        result = run_cli("serve", "--port", "0", "--shards", "1", "--data-dir", str(tmp_path), env=env)
    finally:
        asyncio.run(drop_database(created))
    output = result.stdout + result.stderr
    assert result.returncode > 0, output  # a clean non-zero exit, not a signal
    assert "Traceback" not in output
    assert "LEDGER_API_TOKENS" in result.stderr, output
    assert "token=role" in result.stderr, output
    assert "serving on" not in output


def test_help_lists_commands_and_flags() -> None:
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    for command in ("serve", "check", "migrate"):
        assert command in top.stdout
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0, serve.stderr
    for flag in ("--host", "--port", "--shards", "--data-dir", "--ray-address", "--ray-num-cpus"):
        assert flag in serve.stdout
    for command in ("check", "migrate"):
        sub = run_cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "--data-dir" in sub.stdout
