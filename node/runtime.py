"""Start-up and shutdown of a node: database, migrations, slot map, Ray actors, HTTP.

Order at start: PostgreSQL (given or embedded) -> migrations -> slot map -> Ray and the
actors (each rebuilds its state from PostgreSQL) -> the HTTP front end -> the Kafka payment
consumer (when KAFKA_BOOTSTRAP_SERVERS is set). Shutdown runs the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from aiohttp import web

from actors import runtime as actor_runtime
from actors.gc_policy import tune_gc
from api.app import create_app
from api.approval_routes import GovernanceConfig
from api.audit_log import AUDIT_WRITER
from api.auth import Authenticator, TokenError, parse_tokens
from api.export_routes import EXPORT_SETTINGS
from api.fast_lane import FastSite
from api.finance_routes import RECOGNITION_INTERVAL_S
from api.kafka_consumer import PaymentConsumer
from api.kafka_sinks import FinanceSink
from api.metrics import KafkaMetrics
from api.payout_tasks import PAYOUT_SCHEDULE
from api.posting import Poster
from api.reconcile_routes import RECONCILE_EVERY_S
from api.resharding import MovableShard, Resharder
from api.services import Services
from api.shard_routes import RESHARDER
from finance import payout_schedule
from finance.export_destinations import ExportSettings, settings_from_env
from finance.governance import parse_thresholds
from finance.multisig import parse_policy
from node.config import TOKEN_FILE, NodeConfig, ensure_token_file
from node.security import SecurityConfigError, authenticator, server_ssl_context
from sharding.slots import SlotMap, even_slot_map
from store import repository
from store.audit import AuditWriter
from store.embedded import EmbeddedPostgres
from store.migrations import apply_migrations
from store.settings import SettingsError, resolve_hash_alg

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The node cannot start; the message says why and what to do."""


@dataclass(slots=True)
class Node:
    """A running node (HTTP front end plus its actors)."""

    config: NodeConfig
    dsn: str = ""
    embedded: EmbeddedPostgres | None = None
    pool: asyncpg.Pool | None = None
    services: Services | None = None
    runner: web.AppRunner | None = None
    site: web.TCPSite | None = None  # a `FastSite` unless LEDGER_FAST_LANE=0
    ports: list[Any] = field(default_factory=list)
    token_generated: str | None = None
    audit: AuditWriter | None = None
    app: web.Application | None = None
    consumers: list[PaymentConsumer] = field(default_factory=list)
    export_settings: ExportSettings | None = None
    ssl_context: ssl.SSLContext | None = None
    fleet: _RayFleet | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (https with --tls-cert)."""
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.config.host}:{self.config.port}"

    def _governance(self) -> GovernanceConfig:
        """The multisig settings, checked (StartupError naming the variable)."""
        config = self.config
        try:
            parse_policy(config.multisig)
        except ValueError as exc:
            raise StartupError(f"LEDGER_MULTISIG: {exc}") from None
        try:
            parse_thresholds(config.approval_thresholds)
        except ValueError as exc:
            raise StartupError(f"LEDGER_APPROVAL_THRESHOLDS: {exc}") from None
        if config.approval_ttl_s <= 0:
            raise StartupError("LEDGER_APPROVAL_TTL_S must be > 0")
        return GovernanceConfig(config.multisig, config.approval_thresholds, config.approval_ttl_s)

    def _payout_schedule(self) -> payout_schedule.Schedule | None:
        """The payout schedule, checked (StartupError naming the variable)."""
        try:
            return payout_schedule.parse(self.config.payout_schedule)
        except ValueError as exc:
            raise StartupError(f"{payout_schedule.ENV}: {exc}") from None

    def _export_settings(self) -> ExportSettings:
        """Auditor export settings: the config's, else LEDGER_EXPORT_* from the environment."""
        if self.config.export is not None:
            return self.config.export
        try:
            return settings_from_env(os.environ, self.config.data_dir)
        except (ValueError, OSError) as exc:
            raise StartupError(f"auditor exports: {exc}") from None

    async def start(self) -> None:
        """Bring the whole node up; raise StartupError with a clear message on failure."""
        config = self.config
        self._governance()  # refuse bad settings before anything starts
        self._payout_schedule()
        self.export_settings = self._export_settings()
        auth = self._authenticator()
        try:
            self.ssl_context = server_ssl_context(config)
        except SecurityConfigError as exc:
            raise StartupError(str(exc)) from None
        self.dsn = config.database_url or self._start_embedded()
        self.pool = await repository.create_pool(self.dsn, 2, 8, name="ledger-api")
        async with self.pool.acquire() as conn:
            applied = await apply_migrations(conn)
            if applied:
                log.info("applied migrations %s", applied)
            try:
                hash_alg = await resolve_hash_alg(conn, config.hash_alg)
            except SettingsError as exc:
                raise StartupError(str(exc)) from None
            slot_map = await self._slot_map(conn)
            shard_ids = await repository.active_shards(conn)  # may own no slot yet (`shards add`)
            split = await repository.split_accounts(conn)
        log.info("ledger hash algorithm: %s", hash_alg)
        actor_runtime.start_ray(config.ray_address, config.ray_num_cpus)
        prefix = f"{config.actor_prefix}-{uuid.uuid4().hex[:8]}"
        slots_of = {shard: slot_map.slots_of(shard) for shard in shard_ids}
        signer, signer_kind = await self._start_signer(prefix, hash_alg)
        # Joining a cluster: shards only on nodes offering the custom resource; local: anywhere.
        placement = (
            actor_runtime.shard_placement(config.ray_shard_resource, config.ray_shard_resource_amount)
            if config.ray_address
            else {}
        )
        shards = actor_runtime.spawn_shards(
            prefix, self.dsn, slots_of, config.batch_max, signer is not None, hash_alg, placement
        )
        coordinator = actor_runtime.spawn_coordinator(prefix, self.dsn, shards, config.batch_max, hash_alg)
        self.ports.extend([*shards.values(), coordinator])
        await actor_runtime.wait_ready(self.ports)
        poster = Poster(slot_map, dict(shards), coordinator, split)
        self.services = Services(
            self.pool,
            slot_map,
            dict(shards),
            coordinator,
            auth,
            poster,
            signer=signer,
            signer_kind=signer_kind,
            hash_alg=hash_alg,
            base_currency=config.base_currency,
            mtls=self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED,
        )
        self.audit = AuditWriter(self.dsn, signer, hash_alg=hash_alg, answer_after_commit=config.audit_wait)
        await self.audit.start()
        self.fleet = _RayFleet(self, prefix, signer is not None, hash_alg)
        await self._serve_http()
        await self._start_consumer()
        tune_gc()
        log.info("ledger node serving on %s with %s shards", self.url, len(slot_map.shards))

    def _authenticator(self) -> Authenticator:
        """Tokens from LEDGER_API_TOKENS, or the development token file (generated on first start)."""
        config = self.config
        tokens_spec = config.api_tokens
        source = "LEDGER_API_TOKENS"
        if tokens_spec is None:
            tokens_spec, generated = ensure_token_file(config.data_dir)
            source = str(config.data_dir / TOKEN_FILE)
            if generated:
                self.token_generated = tokens_spec.split("=", 1)[0]
        try:
            return authenticator(config, parse_tokens(tokens_spec))
        except TokenError as exc:
            raise StartupError(f"{source} is malformed: {exc} (expected token=role,token=role)") from None
        except SecurityConfigError as exc:
            raise StartupError(str(exc)) from None

    async def _start_signer(
        self, prefix: str, hash_alg: str = "sha256"
    ) -> tuple[actor_runtime.RaySigner | None, str]:
        """The signer actor (before the shards, which find it by name); its kind, loudly if software."""
        config = self.config
        if not config.signing:
            log.warning("SIGNING IS OFF (LEDGER_SIGNING=off): journals are hashed and chained but not signed")
            return None, "none"
        key_dir = str((config.data_dir / "signer").resolve())
        signer = actor_runtime.spawn_signer(
            prefix, self.dsn, config.signer_env or {}, key_dir, config.checkpoint_every_s, hash_alg
        )
        self.ports.append(signer)
        signer_kind = str((await asyncio.wait_for(signer.status(), 120))["signer"])
        if signer_kind == "software":
            log.warning(
                "SIGNING WITH A SOFTWARE KEY (development default, not an HSM): set LEDGER_PKCS11_MODULE"
            )
        return signer, signer_kind

    async def _start_consumer(self) -> None:
        """The Kafka payment consumers (KAFKA_BOOTSTRAP_SERVERS; `LEDGER_KAFKA_CONSUMERS` of them in
        one group, sharing the partitions), posting through this node's finance service; their
        metrics join the node's `/metrics`."""
        settings = self.config.kafka
        if settings is None:
            return
        assert self.app is not None and self.services is not None
        metrics = KafkaMetrics(self.services.metrics.registry)
        sink = FinanceSink(self.app, settings.topic)
        for n in range(settings.consumers):
            named = replace(settings, client_id=f"{settings.client_id}-{n}")
            consumer = PaymentConsumer(named, sink, metrics)
            try:
                await consumer.start()
            except Exception as exc:
                await self._stop_consumers()
                raise StartupError(f"Kafka at {settings.bootstrap_servers} unreachable: {exc!r}") from None
            self.consumers.append(consumer)

    async def _stop_consumers(self) -> None:
        """Stop the Kafka consumers together (each commits what it acknowledged)."""
        consumers, self.consumers = self.consumers, []
        await asyncio.gather(*(consumer.stop() for consumer in consumers))

    async def _serve_http(self) -> None:
        assert self.services is not None and self.audit is not None
        self.app = app = create_app(self.services, self._governance(), self.config.limits)
        app[AUDIT_WRITER] = self.audit
        assert self.fleet is not None
        app[RESHARDER] = Resharder(self.services, self.fleet, sorted(self.services.shards))
        app[RECOGNITION_INTERVAL_S] = self.config.recognition_interval_s
        schedule = self._payout_schedule()
        if schedule is not None:
            app[PAYOUT_SCHEDULE] = schedule
        app[RECONCILE_EVERY_S] = self.config.reconcile_every_s
        if self.export_settings is not None:
            app[EXPORT_SETTINGS] = self.export_settings
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site_class = FastSite if self.config.fast_lane else web.TCPSite  # api/fast_lane.py
        site = site_class(
            self.runner, self.config.host, self.config.port, backlog=1024, reuse_address=True,
            ssl_context=self.ssl_context,
        )  # fmt: skip
        await site.start()
        self.site = site
        if self.config.port == 0:
            server = site._server
            assert server is not None
            sockets = getattr(server, "sockets", None) or []
            self.config.port = sockets[0].getsockname()[1]

    def _start_embedded(self) -> str:
        self.embedded = EmbeddedPostgres(self.config.data_dir.resolve())
        log.info("starting embedded PostgreSQL in %s", self.config.data_dir)
        return self.embedded.start()

    async def _slot_map(self, conn: asyncpg.Connection) -> SlotMap:
        stored = await repository.load_slot_map(conn)
        if not stored:
            fresh = SlotMap(even_slot_map(self.config.shards))
            await repository.store_slot_map(conn, fresh.as_rows())
            return fresh
        slot_map = SlotMap.from_rows(stored)
        if len(slot_map.shards) != self.config.shards:
            log.warning(
                "--shards %s ignored: the stored slot map has %s shards (resharding is an operator command)",
                self.config.shards,
                len(slot_map.shards),
            )
        return slot_map

    async def stop(self) -> None:
        """Shut everything down (Kafka consumer, HTTP, actors, pool, embedded PostgreSQL)."""
        await self._stop_consumers()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.audit is not None:
            await self.audit.close()
            self.audit = None
        for port in self.ports:
            try:
                actor_runtime.kill(port, restart=False)
            except Exception:
                log.debug("actor already gone", exc_info=True)
        self.ports = []
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


class _RayFleet:
    """`api.resharding.ShardFleet` over Ray: shard actors named like the ones started with the node."""

    def __init__(self, node: Node, prefix: str, signing: bool, hash_alg: str) -> None:
        self.node = node
        self.prefix = prefix
        self.signing = signing
        self.hash_alg = hash_alg
        self.ports: dict[int, actor_runtime.RayShard] = {}

    def spawn(self, shard_id: int) -> MovableShard:
        """A new shard actor; it takes its slots from the stored map (none until a move gives some)."""
        config = self.node.config
        (port,) = actor_runtime.spawn_shards(
            self.prefix, self.node.dsn, {shard_id: []}, config.batch_max, self.signing, self.hash_alg
        ).values()
        self.node.ports.append(port)
        self.ports[shard_id] = port
        return port

    def stop(self, shard_id: int) -> None:
        """Stop a shard actor for good (a removed shard owns no slot any more)."""
        services = self.node.services
        port = self.ports.pop(shard_id, None) or (services.shards.get(shard_id) if services else None)
        if port is None:
            return
        actor_runtime.kill(port, restart=False)  # type: ignore[arg-type]
        if port in self.node.ports:
            self.node.ports.remove(port)
