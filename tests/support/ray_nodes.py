"""A throw-away multi-node Ray cluster on this machine, for tests of `serve --ray-address`.

Each node is a `ray start` with its own temp dir and its own ports, so two raylets share the
machine (and the test session's own local Ray) without clashing. A node is stopped the way a
machine dies: SIGKILL to every process that belongs to it, found by its temp dir in the command
line (raylet, agents, workers) plus everything descended from them. `ray stop` is never used:
it would stop every Ray process on the machine, including other tests' clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
# Detect a dead node within a few seconds (defaults: a check every 3 s, 5 failures).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
}
# Hermetic: a token in ~/.ray (left by someone's `ray get-auth-token`) would otherwise switch the
# head to token auth while the second node and the driver find none.
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_worker_niceness": "0"}


def operator_env() -> dict[str, str]:
    """This process's environment as an operator's shell would have it: without the loopback-only
    switch that importing `actors` sets, and without LEDGER_* settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" and not key.startswith("LEDGER_")
    }


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nobody listens on right now. The sockets stay bound until all are
    chosen: one at a time, the kernel may hand out a port it just gave (two Ray components on one
    port made `ray start` fail)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def processes_of(marker: str) -> set[int]:
    """Pids whose command line mentions `marker` (a node's temp dir), and all their descendants."""
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]
    found = {pid for pid in pids if any(marker in arg for arg in _cmdline(pid))}
    grew = True
    while grew:
        children = {pid for pid in pids if _parent(pid) in found} - found
        found |= children
        grew = bool(children)
    return found


class RayNode:
    """One `ray start` (head or worker) with `resources`, its own temp dir and ports."""

    def __init__(self, resources: dict[str, float], head_address: str | None = None) -> None:
        self.resources = resources
        self.head_address = head_address
        # Short: Ray puts unix sockets under it (107-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="lrn", dir="/tmp")
        self.port = free_port()
        self.log = ""

    @property
    def address(self) -> str:
        """The GCS address to join (only meaningful for a head node)."""
        return f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        flags = (
            "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
        )  # fmt: skip
        while True:  # distinct from each other (free_ports) and from the node's own port
            chosen = free_ports(len(flags))
            if self.port not in chosen:
                break
        ports: dict[str, int] = dict(zip(flags, chosen, strict=True))
        # A window of worker ports around a free one (workers bind lazily; 60 is plenty), clear of
        # the components' ports: Ray refuses a window that holds one of them.
        taken = {*ports.values(), self.port}
        while True:
            low = max(free_port() - 30, 20000)
            if not any(low <= port <= low + 60 for port in taken):
                break
        ports["--min-worker-port"], ports["--max-worker-port"] = low, low + 60
        command = [
            str(RAY),
            "start",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--resources={json.dumps(self.resources)}",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            *(f"{flag}={value}" for flag, value in ports.items()),
        ]
        if self.head_address is None:
            return [*command, "--head", f"--port={self.port}", "--include-dashboard=false"]
        return [*command, f"--address={self.head_address}"]

    def start(self) -> RayNode:
        """Run `ray start`; raise with its output if it fails."""
        env = {**operator_env(), **FAST_FAILURE_DETECTION, **CLUSTER_ENV}
        result = subprocess.run(
            self._command(), env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
        )
        self.log = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"ray start failed ({result.returncode}):\n{self.log}")
        return self

    def kill(self) -> int:
        """SIGKILL every process of this node, as if its machine died; how many were killed."""
        pids = processes_of(self.temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while processes_of(self.temp_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(pids)

    def remove(self) -> None:
        """Kill what is left and delete the temp dir."""
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
