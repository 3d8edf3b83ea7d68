"""`ledger-node backup` and `ledger-node restore`: the restore drill (docs/runbooks/restore-drill.md).

    ledger-node backup --out FILE [--database-url URL | --data-dir DIR]
    ledger-node restore FILE --database-url URL [--public-key PUB.pem ...]

`backup` takes a consistent snapshot of a node's database (`DATABASE_URL`, or the embedded
PostgreSQL of the data directory) while the node keeps serving. `restore` loads a backup into an
EMPTY database, then replays and verifies it (`store.replay`) and prints the counts; it exits 1
and names the first problems when anything does not verify. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from node.config import DEFAULT_DATA_DIR, ConfigError, NodeConfig
from store.backup import BackupError, create_backup, load_dump, open_archive
from store.embedded import EmbeddedPostgres, EmbeddedPostgresError
from store.replay import ReplayReport, replay_and_verify

COMMANDS = ("backup", "restore")
PROBLEMS_SHOWN = 20


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `backup` and `restore`."""
    backup = subparsers.add_parser(
        "backup", help="write a consistent backup (pg_dump + signed checkpoint + keys)"
    )
    backup.add_argument("--out", type=Path, required=True, help="the backup file to write (a tar)")
    backup.add_argument("--database-url", default=None, help="default: $DATABASE_URL, else the embedded one")
    backup.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    restore = subparsers.add_parser(
        "restore", help="restore a backup into an empty database, replay and verify"
    )
    restore.add_argument("backup_file", type=Path, metavar="FILE")
    restore.add_argument("--database-url", required=True, help="an EMPTY database to restore into")
    restore.add_argument(
        "--public-key", dest="public_keys", action="append", type=Path, default=[], metavar="PUB.pem",
        help="a signer public key trusted from outside the backup (repeat for rotated keys)",
    )  # fmt: skip


class _Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {text}", file=sys.stderr, flush=True)


async def _backup(args: argparse.Namespace) -> int:
    progress = _Progress()
    embedded: EmbeddedPostgres | None = None
    dsn = args.database_url
    try:
        if dsn is None:
            dsn = NodeConfig.from_env(data_dir=args.data_dir).database_url
        if dsn is None:
            progress(f"starting the embedded PostgreSQL of {args.data_dir}")
            embedded = EmbeddedPostgres(args.data_dir.resolve())
            dsn = embedded.start()
        summary = await create_backup(dsn, args.out, progress)
    except (BackupError, ConfigError, EmbeddedPostgresError, OSError, asyncpg.PostgresError) as exc:
        print(f"ledger-node backup: {exc}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()
    counts = ", ".join(f"{n} {t}" for t, n in summary.counts.items())
    tree = (
        "no checkpoint yet"
        if summary.checkpoint_tree_size is None
        else f"checkpoint {summary.checkpoint_tree_size}"
    )
    print(f"backup written: {summary.path} ({summary.bytes} bytes); {tree}; {counts}")
    return 0


def _print_report(report: ReplayReport) -> None:
    for problem in report.problems[:PROBLEMS_SHOWN]:
        print(problem)
    if report.problems:
        more = len(report.problems) - PROBLEMS_SHOWN
        if more > 0:
            print(f"... and {more} more")
        print(f"restore FAILED verification: {len(report.problems)} problem(s); do not use this database")
        return
    counts = ", ".join(f"{n} {t}" for t, n in report.counts.items())
    print(
        f"restore verified: {counts}; balances rebuilt ({report.balances_rebuilt} rows, "
        f"{report.balances_changed} changed); {report.unchecked_batches} batches signed after the checkpoint"
    )


async def _restore(args: argparse.Namespace) -> int:
    progress = _Progress()
    try:
        trusted = [Path(p).read_text("ascii") for p in args.public_keys]
    except (OSError, UnicodeDecodeError) as exc:
        print(f"ledger-node restore: cannot read a --public-key: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ledger-restore-") as workdir:
        try:
            archive = open_archive(args.backup_file, Path(workdir))
            progress(
                f"backup of {archive.manifest['database']} at {archive.manifest['created_at']}: manifest ok"
            )
            await load_dump(args.database_url, archive, progress)
            conn = await asyncpg.connect(args.database_url)
            try:
                report = await replay_and_verify(
                    conn,
                    checkpoint=archive.checkpoint,
                    keys=archive.keys,
                    trusted_pems=trusted,
                    progress=progress,
                )
            finally:
                await conn.close()
        except (BackupError, OSError, ValueError, asyncpg.PostgresError) as exc:
            print(f"ledger-node restore: {exc}", file=sys.stderr)
            return 1
    _print_report(report)
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    """Run `backup` or `restore`; the exit status."""
    handler = _backup if args.command == "backup" else _restore
    return asyncio.run(handler(args))
