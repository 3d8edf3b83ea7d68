"""Where auditor exports are published: a local directory (default) or S3 with Object Lock.

Both publish a package that was fully built in a staging directory, and both make a package visible
only once complete:

* `LocalDestination` (`LEDGER_EXPORT_DIR`, default `{data_dir}/exports`): the package is built in
  `{root}/.staging/` (same file system), its files made read-only, and the directory renamed to
  `{root}/{export_id}` in one `rename(2)`; an existing package is never replaced.
* `S3Destination` (`LEDGER_EXPORT_S3_BUCKET`, `LEDGER_EXPORT_S3_PREFIX`, `LEDGER_EXPORT_RETENTION_DAYS`,
  `LEDGER_EXPORT_S3_ENDPOINT_URL`, `LEDGER_EXPORT_S3_REGION`; credentials from the usual AWS chain):
  every object is put with Object Lock in COMPLIANCE mode until now + retention days, data files
  first and `manifest.json` last, through aiobotocore. An object under the prefix without the
  manifest is not an export (verification refuses it, and the node reports the export failed);
  compliance-mode objects cannot be deleted, so a failed attempt's objects stay until their
  retention ends and the retry writes new versions of the same keys.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from finance.audit_export import ordered_files
from signer.export_verify import MANIFEST_FILE

STAGING_DIR: Final = ".staging"
PII_KEY_FILE: Final = "pii-key"
RETENTION_DAYS_DEFAULT: Final = 2557  # seven years
READ_ONLY: Final = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


class ExportDestinationError(Exception):
    """Publishing or reading an export failed (answered 500 AUDIT_EXPORT_ERROR)."""


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """Export configuration (module docstring); `pii_key` keys the pseudonyms."""

    root: Path
    pii_key: bytes
    s3_bucket: str | None = None
    s3_prefix: str = "ledger-node"
    retention_days: int = RETENTION_DAYS_DEFAULT
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    service: str = "ledger-node"
    env: str = "development"

    @property
    def destination(self) -> str:
        """`s3` when a bucket is configured, else `local`."""
        return "s3" if self.s3_bucket else "local"


def pii_key(env: Mapping[str, str], data_dir: Path) -> bytes:
    """`LEDGER_PII_KEY` (any text), else a random key kept in `{data_dir}/pii-key` (mode 0600)."""
    text = env.get("LEDGER_PII_KEY") or ""
    if text:
        return text.encode()
    path = data_dir / PII_KEY_FILE
    if path.exists():
        return path.read_bytes()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def settings_from_env(env: Mapping[str, str], data_dir: Path) -> ExportSettings:
    """The export settings of a node; `ValueError` naming a bad variable."""
    text = env.get("LEDGER_EXPORT_RETENTION_DAYS") or str(RETENTION_DAYS_DEFAULT)
    try:
        days = int(text)
    except ValueError:
        raise ValueError(f"LEDGER_EXPORT_RETENTION_DAYS must be an integer, got {text!r}") from None
    if not 1 <= days <= 36500:
        raise ValueError(f"LEDGER_EXPORT_RETENTION_DAYS must be between 1 and 36500, got {days}")
    return ExportSettings(
        root=Path(env.get("LEDGER_EXPORT_DIR") or data_dir / "exports").resolve(),
        pii_key=pii_key(env, data_dir),
        s3_bucket=env.get("LEDGER_EXPORT_S3_BUCKET") or None,
        s3_prefix=(env.get("LEDGER_EXPORT_S3_PREFIX") or "ledger-node").strip("/"),
        retention_days=days,
        s3_endpoint_url=env.get("LEDGER_EXPORT_S3_ENDPOINT_URL") or None,
        s3_region=env.get("LEDGER_EXPORT_S3_REGION") or env.get("AWS_REGION") or "us-east-1",
        service=env.get("LEDGER_SERVICE_NAME") or "ledger-node",
        env=env.get("LEDGER_ENV") or "development",
    )


def new_staging_dir(settings: ExportSettings, export_id: str) -> Path:
    """A fresh directory to build a package in (under the local root: same file system)."""
    base = settings.root / STAGING_DIR
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{export_id}.{secrets.token_hex(6)}"
    path.mkdir()
    return path


def package_files(staged: Path) -> list[str]:
    """Every file of a staged package, as relative POSIX paths."""
    return sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())


class Destination(Protocol):
    """Where packages go."""

    kind: str

    async def publish(self, export_id: str, staged: Path, now: datetime) -> str:
        """Publish a complete staged package; its location. The staged directory is consumed."""
        ...

    async def read(self, export_id: str, name: str) -> bytes:
        """One published file."""
        ...

    async def ready(self) -> dict[str, Any]:
        """`{ok, ...}` for `GET /ready`."""
        ...


class LocalDestination:
    """A directory on the node (module docstring)."""

    kind = "local"

    def __init__(self, settings: ExportSettings) -> None:
        self.root = settings.root

    def path(self, export_id: str) -> Path:
        """The directory of a published export."""
        return self.root / export_id

    async def publish(self, export_id: str, staged: Path, now: datetime) -> str:
        target = self.path(export_id)
        if target.exists():
            raise ExportDestinationError(f"{target} already exists; exports are never overwritten")
        for name in package_files(staged):
            (staged / name).chmod(READ_ONLY)
        try:
            staged.rename(target)
        except OSError as exc:
            raise ExportDestinationError(f"could not publish to {target}: {exc}") from exc
        return str(target)

    async def read(self, export_id: str, name: str) -> bytes:
        return (self.path(export_id) / name).read_bytes()

    async def ready(self) -> dict[str, Any]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            good = os.access(self.root, os.W_OK)
        except OSError:
            good = False
        return {"ok": good, "kind": self.kind, "location": str(self.root)}


class S3Destination:
    """An S3 bucket with Object Lock (module docstring)."""

    kind = "s3"

    def __init__(self, settings: ExportSettings) -> None:
        if not settings.s3_bucket:
            raise ValueError("S3 destination without a bucket")
        self.settings = settings
        self.bucket: str = settings.s3_bucket

    def key(self, export_id: str, name: str) -> str:
        """The object key of a package file."""
        prefix = f"{self.settings.s3_prefix}/" if self.settings.s3_prefix else ""
        return f"{prefix}{export_id}/{name}"

    def location(self, export_id: str) -> str:
        """`s3://bucket/prefix/export_id/`."""
        return f"s3://{self.bucket}/{self.key(export_id, '')}"

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        """An aiobotocore S3 client with bounded retries and timeouts."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
        )
        async with get_session().create_client(
            "s3",
            region_name=self.settings.s3_region,
            endpoint_url=self.settings.s3_endpoint_url,
            config=config,
        ) as client:
            yield client

    async def publish(self, export_id: str, staged: Path, now: datetime) -> str:
        until = now + timedelta(days=self.settings.retention_days)
        names = package_files(staged)
        if MANIFEST_FILE not in names:
            raise ExportDestinationError("a package without its manifest cannot be published")
        order = ordered_files(names)
        try:
            async with self.client() as s3:
                for name in order:
                    await s3.put_object(
                        Bucket=self.bucket,
                        Key=self.key(export_id, name),
                        Body=(staged / name).read_bytes(),
                        ObjectLockMode="COMPLIANCE",
                        ObjectLockRetainUntilDate=until,
                    )
        except Exception as exc:
            raise ExportDestinationError(f"S3 upload to {self.location(export_id)} failed: {exc}") from exc
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return self.location(export_id)

    async def read(self, export_id: str, name: str) -> bytes:
        try:
            async with self.client() as s3:
                answer = await s3.get_object(Bucket=self.bucket, Key=self.key(export_id, name))
                async with answer["Body"] as body:
                    data: bytes = await body.read()
                    return data
        except Exception as exc:
            raise ExportDestinationError(f"could not read {name} of {export_id} from S3: {exc}") from exc

    async def ready(self) -> dict[str, Any]:
        try:
            async with self.client() as s3:
                await s3.head_bucket(Bucket=self.bucket)
                lock = await s3.get_object_lock_configuration(Bucket=self.bucket)
            good = lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except Exception:
            good = False
        return {"ok": good, "kind": self.kind, "location": f"s3://{self.bucket}/"}


def destination_for(settings: ExportSettings) -> Destination:
    """The destination the settings name."""
    if settings.s3_bucket:
        return S3Destination(settings)
    return LocalDestination(settings)
