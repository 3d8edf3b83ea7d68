"""Node configuration: command-line flags over environment variables over defaults."""

from __future__ import annotations

import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from api.kafka_consumer import BATCH_MAX_DEFAULT, KafkaSettings
from api.limits import LimitConfigError, LimitSettings, limit_settings_from_env
from api.oidc import OidcSettings
from finance import payout_schedule, payouts
from finance.export_destinations import ExportSettings

DEFAULT_DATA_DIR = Path(".ledger-data")
TOKEN_FILE = "api-tokens"
APPROVAL_THRESHOLDS_DEFAULT = "journal=10000000,payout_batch=10000000,payout=5000000,escrow_release=5000000"
"""Gated kinds and their thresholds (minor units of the base currency) unless LEDGER_APPROVAL_THRESHOLDS."""


class ConfigError(ValueError):
    """An environment variable holds a value the node cannot use; the message names it."""


def env_seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment (unset or empty: `default`)."""
    text = os.environ.get(name) or ""
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {text!r}")
    return value


def env_limits() -> LimitSettings:
    """The load-shedding limits from the environment (api/limits.py)."""
    try:
        return limit_settings_from_env()
    except LimitConfigError as exc:
        raise ConfigError(str(exc)) from None


def env_payout_schedule(name: str = payout_schedule.ENV) -> str:
    """`LEDGER_PAYOUT_SCHEDULE` checked (off, every:<seconds>, daily@HH:MM UTC); unset or empty: `off`."""
    text = (os.environ.get(name) or "").strip() or "off"
    try:
        payout_schedule.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return text


def env_clawback_reversals(name: str = payouts.REVERSALS_ENV) -> bool:
    """`LEDGER_CLAWBACK_REVERSALS` checked (on|off, 1|0, true|false; unset: off)."""
    try:
        return payouts.parse_reversals(os.environ.get(name) or "")
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None


def env_int(name: str, default: int, low: int, high: int) -> int:
    """An integer in [low, high] from the environment (unset or empty: `default`)."""
    text = os.environ.get(name) or ""
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def kafka_from_env() -> KafkaSettings | None:
    """The Kafka consumer's settings when `KAFKA_BOOTSTRAP_SERVERS` is set (docs/kafka.md), else None.

    `LEDGER_KAFKA_TOPIC` (payments), `LEDGER_KAFKA_GROUP` (ledger-node-payments),
    `LEDGER_KAFKA_DLQ_TOPIC` ({topic}.dlq), `LEDGER_KAFKA_BATCH_MAX` (2000, 1..10000),
    `LEDGER_KAFKA_CONCURRENCY` (64, 1..1024), `LEDGER_KAFKA_CONSUMERS` (3, 1..64),
    `LEDGER_KAFKA_RETRY_MAX_S` (10).
    """
    servers = (os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "").strip()
    if not servers:
        return None
    topic = os.environ.get("LEDGER_KAFKA_TOPIC") or "payments"
    dlq_topic = os.environ.get("LEDGER_KAFKA_DLQ_TOPIC") or ""
    if dlq_topic == topic:
        raise ConfigError("LEDGER_KAFKA_DLQ_TOPIC must differ from LEDGER_KAFKA_TOPIC")
    retry_max_s = env_seconds("LEDGER_KAFKA_RETRY_MAX_S", 10.0)
    if retry_max_s <= 0:
        raise ConfigError("LEDGER_KAFKA_RETRY_MAX_S must be > 0")
    return KafkaSettings(
        bootstrap_servers=servers,
        topic=topic,
        group_id=os.environ.get("LEDGER_KAFKA_GROUP") or "ledger-node-payments",
        dlq_topic=dlq_topic,
        batch_max=env_int("LEDGER_KAFKA_BATCH_MAX", BATCH_MAX_DEFAULT, 1, 10_000),
        concurrency=env_int("LEDGER_KAFKA_CONCURRENCY", 64, 1, 1024),
        consumers=env_int("LEDGER_KAFKA_CONSUMERS", 3, 1, 64),
        retry_max_s=retry_max_s,
    )


def oidc_from_env() -> OidcSettings | None:
    """OIDC operator sign-in when `LEDGER_OIDC_ISSUER` is set (docs/security.md), else None.

    Needs `LEDGER_OIDC_AUDIENCE` and exactly one of `LEDGER_OIDC_JWKS_URL` / `LEDGER_OIDC_JWKS_FILE`;
    `LEDGER_OIDC_ROLES_CLAIM` (roles), `LEDGER_OIDC_LEEWAY_S` (30), `LEDGER_OIDC_JWKS_TTL_S` (3600),
    `LEDGER_OIDC_JWKS_REFRESH_MIN_S` (30: the least time between fetches for an unknown kid).
    """
    issuer = (os.environ.get("LEDGER_OIDC_ISSUER") or "").strip()
    if not issuer:
        return None
    audience = (os.environ.get("LEDGER_OIDC_AUDIENCE") or "").strip()
    if not audience:
        raise ConfigError("LEDGER_OIDC_AUDIENCE must be set with LEDGER_OIDC_ISSUER")
    url = (os.environ.get("LEDGER_OIDC_JWKS_URL") or "").strip() or None
    file = (os.environ.get("LEDGER_OIDC_JWKS_FILE") or "").strip() or None
    if (url is None) == (file is None):
        raise ConfigError("set exactly one of LEDGER_OIDC_JWKS_URL and LEDGER_OIDC_JWKS_FILE")
    if url is not None and not url.startswith(("https://", "http://")):
        raise ConfigError(f"LEDGER_OIDC_JWKS_URL must be an http(s) URL, got {url!r}")
    if file is not None and not Path(file).is_file():
        raise ConfigError(f"LEDGER_OIDC_JWKS_FILE {file!r} is not a readable file")
    return OidcSettings(
        issuer=issuer,
        audience=audience,
        jwks_url=url,
        jwks_file=Path(file) if file is not None else None,
        roles_claim=(os.environ.get("LEDGER_OIDC_ROLES_CLAIM") or "").strip() or "roles",
        leeway_s=env_seconds("LEDGER_OIDC_LEEWAY_S", 30.0),
        jwks_ttl_s=env_seconds("LEDGER_OIDC_JWKS_TTL_S", 3600.0),
        jwks_refresh_min_s=env_seconds("LEDGER_OIDC_JWKS_REFRESH_MIN_S", 30.0),
    )


def env_path(name: str) -> Path | None:
    """A path from the environment (unset or empty: None)."""
    text = (os.environ.get(name) or "").strip()
    return Path(text) if text else None


RESOURCE_AMOUNT_MAX = 1000.0


def env_resource_name(name: str, default: str) -> str:
    """A Ray custom resource name (letters, digits, `_`, `-`, `.`, `/`); unset: `default`, empty: none."""
    text = os.environ.get(name)
    if text is None:
        return default
    text = text.strip()
    if text and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-/]{0,62}", text):
        raise ConfigError(f"{name} must be a Ray resource name like ledger_shard, got {text!r}")
    return text


def resource_amount(name: str, text: str) -> float:
    """A Ray resource amount in (0, 1000]; fractional amounts let several shards share one unit."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None
    if not 0 < value <= RESOURCE_AMOUNT_MAX:
        raise ConfigError(f"{name} must be > 0 and <= {RESOURCE_AMOUNT_MAX:g}, got {text!r}")
    return value


def env_resource_amount(name: str, default: float) -> float:
    """`resource_amount` of an environment variable (unset or empty: `default`)."""
    text = (os.environ.get(name) or "").strip()
    return resource_amount(name, text) if text else default


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def env_duration(name: str, default: float) -> float:
    """Seconds from the environment, as a number of seconds (`900`) or a duration with one unit
    (`30s`, `15m`, `1h`, `1d`); unset or empty: `default`. Anything else is a `ConfigError`."""
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    unit = _DURATION_UNITS.get(text[-1:].lower())
    if unit is None:
        return env_seconds(name, default)
    try:
        value = float(text[:-1]) * unit
    except ValueError:
        raise ConfigError(f"{name} must be seconds or a duration like 15m, 1h, 1d; got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a finite duration >= 0, got {text!r}")
    return value


@dataclass(slots=True)
class NodeConfig:
    """Everything `ledger-node serve` needs to start."""

    host: str = "127.0.0.1"
    port: int = 8080
    shards: int = 4
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None
    api_tokens: str | None = None
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    # LEDGER_RAY_SHARD_RESOURCE / _AMOUNT: when joining a Ray cluster (--ray-address), each shard
    # actor needs this much of this custom resource, so operators choose which Ray nodes hold shards
    # (`ray start --resources='{"ledger_shard": 4}'`). Empty name: no resource. A local cluster
    # (no --ray-address) never asks for it.
    ray_shard_resource: str = "ledger_shard"
    ray_shard_resource_amount: float = 1.0
    batch_max: int = 8192
    actor_prefix: str = "ledger"
    signing: bool = True
    checkpoint_every_s: float = 0.25
    signer_env: dict[str, str] | None = None
    hash_alg: str | None = None  # LEDGER_HASH_ALG (sha256 | blake3); None: the ledger's, sha256 when new
    # LEDGER_AUDIT_WAIT=1: answer a state change only once its audit event is committed (one more
    # group commit of latency). Default: the event is queued in order and committed right after.
    audit_wait: bool = False
    # LEDGER_BASE_CURRENCY: the platform's base currency (ISO 4217) for FX rates and settlement (D2).
    base_currency: str = "USD"
    # LEDGER_RECOGNITION_INTERVAL_S: seconds between the node's revenue recognition runs (posting
    # due installments of ratable schedules); 0 turns the periodic run off.
    recognition_interval_s: float = 60.0
    # LEDGER_PAYOUT_SCHEDULE: off (default), every:<seconds> or daily@HH:MM (UTC): the node runs an
    # "all due" payout run at that schedule (finance/payout_schedule.py, api/payout_tasks.py).
    payout_schedule: str = "off"
    # LEDGER_CLAWBACK_REVERSALS: on|off (default off): a clawback that leaves a participant's payable
    # negative takes the money back from its paid Stripe transfers (finance/payouts.py).
    clawback_reversals: bool = False
    # LEDGER_RECONCILE_EVERY: seconds (or 30s / 15m / 1h / 1d) between scheduled reconciliation runs
    # against Stripe, each covering the window since the previous one; unset or 0: off.
    reconcile_every_s: float = 0.0
    # Multisig governance (finance/governance.py): LEDGER_MULTISIG (m-of-n approvals, default 3-of-5),
    # LEDGER_APPROVAL_THRESHOLDS (kind=minor units of the base currency at or above which an action
    # waits for approvals), LEDGER_APPROVAL_TTL_S (how long an action may wait; default 7 days).
    multisig: str = "3-of-5"
    approval_thresholds: str = APPROVAL_THRESHOLDS_DEFAULT
    approval_ttl_s: float = 7 * 24 * 3600.0
    # KAFKA_BOOTSTRAP_SERVERS and LEDGER_KAFKA_*: the payment-event consumer `serve` runs (None: off).
    kafka: KafkaSettings | None = None
    # Auditor exports (finance/export_destinations.py): None reads LEDGER_EXPORT_DIR, LEDGER_EXPORT_S3_*,
    # LEDGER_EXPORT_RETENTION_DAYS, LEDGER_PII_KEY, LEDGER_ENV at start-up (data dir as the default root).
    export: ExportSettings | None = None
    # Transport security (docs/security.md): --tls-cert/--tls-key (LEDGER_TLS_CERT, LEDGER_TLS_KEY)
    # serve HTTPS; --client-ca (LEDGER_TLS_CLIENT_CA) adds mTLS (client certificates required);
    # --client-map (LEDGER_TLS_CLIENT_MAP) maps certificate identities to principals and roles.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    client_map: Path | None = None
    # LEDGER_OIDC_*: operator sign-in with OIDC JWTs (None: off).
    oidc: OidcSettings | None = None
    # LEDGER_ALLOW_STATIC_OPERATOR_TOKENS=1: keep static operator/admin tokens while OIDC is on (D5).
    allow_static_operator_tokens: bool = False
    # LEDGER_RATE_LIMIT, LEDGER_TOKEN_IN_FLIGHT_MAX, LEDGER_IN_FLIGHT_MAX, LEDGER_IN_FLIGHT_BYTES_MAX,
    # LEDGER_IN_FLIGHT_WAIT_MS: load shedding (api/limits.py, docs/api.md "Limits").
    limits: LimitSettings = field(default_factory=LimitSettings)
    # LEDGER_FAST_LANE=0: serve `POST /ledger/post` through aiohttp's full request path too
    # (default on: api/fast_lane.py answers plain keep-alive posts itself; off under TLS anyway).
    fast_lane: bool = True

    @classmethod
    def from_env(cls, **overrides: object) -> NodeConfig:
        """Defaults, then `DATABASE_URL`, `LEDGER_API_TOKENS`, `LEDGER_RAY_ADDRESS` etc., then overrides.

        `LEDGER_HASH_ALG` (sha256 | blake3) is only applied when a ledger is created (see store.settings).
        """
        config = cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            api_tokens=os.environ.get("LEDGER_API_TOKENS") or None,
            ray_address=os.environ.get("LEDGER_RAY_ADDRESS") or None,
            ray_shard_resource=env_resource_name("LEDGER_RAY_SHARD_RESOURCE", "ledger_shard"),
            ray_shard_resource_amount=env_resource_amount("LEDGER_RAY_SHARD_RESOURCE_AMOUNT", 1.0),
            signing=os.environ.get("LEDGER_SIGNING", "on") != "off",
            signer_env=dict(os.environ),
            hash_alg=os.environ.get("LEDGER_HASH_ALG") or None,
            audit_wait=os.environ.get("LEDGER_AUDIT_WAIT", "0") == "1",
            base_currency=os.environ.get("LEDGER_BASE_CURRENCY") or "USD",
            recognition_interval_s=env_seconds("LEDGER_RECOGNITION_INTERVAL_S", 60.0),
            payout_schedule=env_payout_schedule(),
            clawback_reversals=env_clawback_reversals(),
            reconcile_every_s=env_duration("LEDGER_RECONCILE_EVERY", 0.0),
            multisig=os.environ.get("LEDGER_MULTISIG") or "3-of-5",
            approval_thresholds=os.environ.get("LEDGER_APPROVAL_THRESHOLDS", APPROVAL_THRESHOLDS_DEFAULT),
            approval_ttl_s=env_seconds("LEDGER_APPROVAL_TTL_S", 7 * 24 * 3600.0),
            kafka=kafka_from_env(),
            tls_cert=env_path("LEDGER_TLS_CERT"),
            tls_key=env_path("LEDGER_TLS_KEY"),
            client_ca=env_path("LEDGER_TLS_CLIENT_CA"),
            client_map=env_path("LEDGER_TLS_CLIENT_MAP"),
            oidc=oidc_from_env(),
            allow_static_operator_tokens=os.environ.get("LEDGER_ALLOW_STATIC_OPERATOR_TOKENS", "0") == "1",
            limits=env_limits(),
            fast_lane=os.environ.get("LEDGER_FAST_LANE", "1") != "0",
        )
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        return config


def ensure_token_file(data_dir: Path) -> tuple[str, bool]:
    """The development token spec from the data dir, generating a service token on first use.

    Returns (spec, generated). The file holds `token=service` and has mode 0600.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), False
    spec = f"{secrets.token_urlsafe(32)}=service"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(spec + "\n")
    return spec, True
