"""The `ledger-node` command line.

    ledger-node serve  [--host H] [--port P] [--shards N] [--data-dir DIR] [--ray-address A]
                       [--tls-cert PEM --tls-key PEM [--client-ca PEM [--client-map FILE]]]
                       [--ray-shard-resource NAME] [--ray-shard-resource-amount X]
                                                 (--ray-address / LEDGER_RAY_ADDRESS: join that Ray
                                                 cluster; shard actors then need the custom resource)
                                                 (also consumes Kafka when KAFKA_BOOTSTRAP_SERVERS is set)
    ledger-node consume --url URL [--metrics-port P]
                                                 consume Kafka payment events in a separate process,
                                                 posting them to the node at URL (LEDGER_API_TOKEN)
    ledger-node check  [--data-dir DIR]          recompute balances, verify chains and signatures
    ledger-node migrate [--data-dir DIR]         apply pending schema migrations and exit
    ledger-node verify PROOF --public-key PEM    verify a proof package offline (no server needed)
    ledger-node verify EXPORT_DIR --public-key PEM
                                                 verify an auditor export package offline
    ledger-node export FROM TO [--pii] [--out DIR] [--url URL]
                                                 auditor export through the node, with a progress bar
    ledger-node keys rotate [--url URL]          switch the signer to a new key
    ledger-node export --out PATH [--url URL] [--from D] [--to D] [--format F]
                                                 fetch an accounting export (default: yesterday)
    ledger-node approve ACTION_ID --key PEM --approver-id ID [--url URL]
                                                 sign and submit a multisig approval
    ledger-node backup --out FILE [--data-dir DIR]
                                                 consistent snapshot: pg_dump + signed checkpoint + keys
    ledger-node restore FILE --database-url URL [--public-key PEM ...]
                                                 load into an empty database, replay and verify
    ledger-node shards list|add N|remove ID [--url URL]
    ledger-node slots move SLOT.. --to SHARD [--url URL]
                                                 online resharding (docs/operations.md)

With `DATABASE_URL` set the node uses that PostgreSQL; otherwise it runs an embedded
PostgreSQL inside the data directory and stops it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from actors.runtime import stop_ray
from api.auth import TokenError
from api.kafka_consumer import PaymentConsumer
from api.kafka_sinks import HttpSink
from api.metrics import KafkaMetrics
from node import approve_cli, backup_cli, export_cli, journal_export_cli, keys_cli, shards_cli, verify_cli
from node.config import (
    DEFAULT_DATA_DIR,
    TOKEN_FILE,
    ConfigError,
    NodeConfig,
    kafka_from_env,
    resource_amount,
)
from node.runtime import Node, StartupError
from store.embedded import EmbeddedPostgres, EmbeddedPostgresError
from store.integrity import integrity_problems
from store.migrations import MigrationError, apply_migrations

log = logging.getLogger("ledger-node")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledger-node", description="Ledger Node: a sharded double-entry ledger"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the node (HTTP API, shard actors, coordinator)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--shards", type=int, default=4, help="shards for a new ledger (default 4)")
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    serve.add_argument("--ray-num-cpus", type=int, default=None)
    serve.add_argument(
        "--tls-cert", type=Path, default=None, help="serve HTTPS with this PEM certificate chain"
    )
    serve.add_argument("--tls-key", type=Path, default=None, help="the certificate's PEM private key")
    serve.add_argument(
        "--client-ca", type=Path, default=None, help="require client certificates from this CA (mTLS)"
    )
    serve.add_argument(
        "--client-map", type=Path, default=None, help="certificate identity -> role map (docs/security.md)"
    )
    serve.add_argument(
        "--ray-shard-resource",
        default=None,
        help="custom resource each shard actor needs when joining a cluster (default ledger_shard, "
        "LEDGER_RAY_SHARD_RESOURCE; empty: none)",
    )
    serve.add_argument(
        "--ray-shard-resource-amount",
        default=None,
        help="how much of it per shard actor (default 1, LEDGER_RAY_SHARD_RESOURCE_AMOUNT)",
    )
    consume = commands.add_parser(
        "consume", help="consume Kafka payment events and post them to a node over HTTP (docs/kafka.md)"
    )
    consume.add_argument("--url", required=True, help="the node's base URL, e.g. http://127.0.0.1:8080")
    consume.add_argument("--metrics-host", default="127.0.0.1")
    consume.add_argument("--metrics-port", type=int, default=9108, help="GET /metrics here (0: off)")
    for name, text in (
        ("check", "verify balances, chains and signatures"),
        ("migrate", "apply schema migrations"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    verify_cli.add_parser(commands)
    keys_cli.add_parser(commands)
    approve_cli.add_parser(commands)
    export_cli.add_parser(commands)
    backup_cli.add_parsers(commands)
    journal_export_cli.add_parser(commands)
    shards_cli.add_parsers(commands)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    if not 1 <= args.shards <= 1024:
        print("ledger-node: --shards must be between 1 and 1024", file=sys.stderr)
        return 2
    try:
        amount = args.ray_shard_resource_amount
        config = NodeConfig.from_env(
            ray_shard_resource=args.ray_shard_resource,
            ray_shard_resource_amount=None
            if amount is None
            else resource_amount("--ray-shard-resource-amount", amount),
            host=args.host,
            port=args.port,
            shards=args.shards,
            data_dir=args.data_dir,
            ray_address=args.ray_address,
            ray_num_cpus=args.ray_num_cpus,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            client_map=args.client_map,
        )
    except ConfigError as exc:
        print(f"ledger-node: cannot start: {exc}", file=sys.stderr)
        return 2
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await node.start()
    except (
        StartupError,
        EmbeddedPostgresError,
        MigrationError,
        TokenError,
        OSError,
        asyncpg.PostgresError,
    ) as exc:
        print(f"ledger-node: cannot start: {exc}", file=sys.stderr)
        await node.stop()
        stop_ray()
        return 1
    if node.token_generated:
        print(
            f"Generated a service token (stored in {config.data_dir / TOKEN_FILE}, mode 0600):\n"
            f"  {node.token_generated}\n",
            flush=True,
        )
    # After start: ray.init() installs its own SIGTERM handler (sys.exit), which would skip
    # the orderly shutdown below and leave the embedded PostgreSQL running.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ledger-node serving on {node.url}", flush=True)
    await stop.wait()
    print("ledger-node stopping", flush=True)
    await node.stop()
    stop_ray()
    return 0


async def _serve_metrics(registry: Any, host: str, port: int) -> web.AppRunner | None:
    """`GET /metrics` of a `consume` process (its own registry); None when `port` is 0."""
    if port == 0:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _consume(args: argparse.Namespace) -> int:
    """Consume payment events (KAFKA_BOOTSTRAP_SERVERS, LEDGER_KAFKA_*) into the node at --url."""
    try:
        settings = kafka_from_env()
    except ConfigError as exc:
        print(f"ledger-node: cannot start: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get("LEDGER_API_TOKEN") or ""
    if settings is None or not token:
        print("ledger-node: consume needs KAFKA_BOOTSTRAP_SERVERS and LEDGER_API_TOKEN", file=sys.stderr)
        return 2
    sink = HttpSink(args.url, token)
    metrics = KafkaMetrics()
    consumers = [
        PaymentConsumer(replace(settings, client_id=f"{settings.client_id}-{n}"), sink, metrics)
        for n in range(settings.consumers)
    ]
    runner: web.AppRunner | None = None
    try:
        for consumer in consumers:
            await consumer.start()
        runner = await _serve_metrics(metrics.registry, args.metrics_host, args.metrics_port)
    except Exception as exc:
        print(f"ledger-node: cannot start: {exc!r}", file=sys.stderr)
        await asyncio.gather(*(consumer.stop() for consumer in consumers))
        await sink.close()
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"ledger-node consuming {settings.topic} into {args.url} ({len(consumers)} consumers)", flush=True)
    await stop.wait()
    await asyncio.gather(*(consumer.stop() for consumer in consumers))
    await sink.close()
    if runner is not None:
        await runner.cleanup()
    return 0


@contextlib.asynccontextmanager
async def _database(data_dir: Path) -> AsyncIterator[asyncpg.Connection]:
    """A connection to DATABASE_URL, or to the embedded PostgreSQL of the data dir."""
    config = NodeConfig.from_env(data_dir=data_dir)
    embedded: EmbeddedPostgres | None = None
    dsn = config.database_url
    if dsn is None:
        embedded = EmbeddedPostgres(data_dir.resolve())
        dsn = embedded.start()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()


async def _check(args: argparse.Namespace) -> int:
    async with _database(args.data_dir) as conn:
        problems = await integrity_problems(conn)
        journals = await conn.fetchval("SELECT count(*) FROM journals")
        accounts = await conn.fetchval("SELECT count(*) FROM accounts")
    for problem in problems:
        print(problem)
    if problems:
        print(f"check FAILED: {len(problems)} problem(s) in {journals} journals, {accounts} accounts")
        return 1
    print(
        f"check passed: {journals} journals, {accounts} accounts, balances, chains and signatures consistent"
    )
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    async with _database(args.data_dir) as conn:
        applied = await apply_migrations(conn)
    print(f"applied migrations: {applied or 'none pending'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ledger-node` script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "verify":
        return verify_cli.run(args)
    if args.command == "keys":
        return keys_cli.run(args)
    if args.command == "approve":
        return approve_cli.run(args)
    if args.command == "export":
        return export_cli.run(args)
    if args.command in backup_cli.COMMANDS:
        return backup_cli.run(args)
    if args.command == "export-journal":
        return journal_export_cli.run(args)
    if args.command in ("shards", "slots"):
        return shards_cli.run(args)
    import uvloop

    handlers = {"serve": _serve, "consume": _consume, "check": _check, "migrate": _migrate}
    return int(uvloop.run(handlers[args.command](args)))


if __name__ == "__main__":
    raise SystemExit(main())
