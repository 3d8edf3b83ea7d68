"""The README path on a fresh setup: `ledger-node serve` on embedded defaults, then curl.

A newcomer has no DATABASE_URL and no LEDGER_API_TOKENS: the node starts an embedded PostgreSQL 18
in its data dir and generates a service token. They post `docs/examples/journal.json` with curl,
replay it, read it back, stop the node (SIGTERM from a supervisor, Ctrl-C in a terminal) and start
it again. Everything runs as real processes: the installed `ledger-node` script and the curl binary.

The data dir sits under a 0755 directory so that, as root, the embedded server (user `ledger-pg`)
reaches it directly and its cluster is `<data-dir>/postgres`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ledger-node")
EXAMPLE = REPO / "docs" / "examples" / "journal.json"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
TOKEN_LINE = "Generated a service token"
POSTED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
JOURNAL_ID = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")
# What a newcomer's shell does not have; LEDGER_RAY_ADDRESS / RAY_ADDRESS would join another Ray.
UNSET = ("DATABASE_URL", "LEDGER_API_TOKENS", "LEDGER_RAY_ADDRESS", "RAY_ADDRESS")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def newcomer_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in UNSET}


@dataclass
class Server:
    """One `ledger-node serve` process, its output in files under `logs`."""

    data_dir: Path
    logs: Path
    run: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout_path(self) -> Path:
        return self.logs / f"serve-{self.run}.out"

    @property
    def stderr_path(self) -> Path:
        return self.logs / f"serve-{self.run}.err"

    def start(self) -> Server:
        """`ledger-node serve --host 127.0.0.1 --port P --shards 2 --data-dir D`, as `make run` does."""
        command = [str(CLI), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--shards", "2", "--data-dir", str(self.data_dir)]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=newcomer_env(), stdout=out, stderr=err, start_new_session=True
            )
        return self

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def output(self) -> str:
        """Both streams, for failure messages (the tail of stderr: Ray is chatty)."""
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr_path.read_text()[-6000:]}"

    def wait_ready(self) -> None:
        """Poll GET /ready until it answers 200 (fail early if the process exits)."""
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ledger-node exited with {self.process.returncode}\n{self.output()}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),  # not listening yet
                urllib.request.urlopen(f"{self.url}/ready", timeout=5) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.5)
        pytest.fail(f"GET /ready did not answer 200 within {READY_TIMEOUT_S}s\n{self.output()}")

    def wait_for_stdout(self, text: str, timeout_s: float = 15.0) -> str:
        """The stdout once it contains `text` (the banner follows readiness by a moment)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.stdout() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.stdout()

    def stop(self, sig: signal.Signals) -> int | None:
        """Send `sig` to the node process; its exit code, or None if it is still running after 60 s."""
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Clean-up: end the node's whole process group if anything of it is left."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def postgres_processes(data_dir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every postgres process whose command line mentions `data_dir`."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True)
    found = []
    for line in listing.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "postgres" in args and str(data_dir) in args:
            found.append((int(pid), args))
    return found


def wait_postgres_gone(data_dir: Path, timeout_s: float = 10.0) -> list[tuple[int, str]]:
    """The postgres processes of `data_dir` still there after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    left = postgres_processes(data_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = postgres_processes(data_dir)
    return left


def stop_leftover_postgres(data_dir: Path) -> None:
    """Clean-up only: fast-shutdown a postmaster the node left running on `data_dir`."""
    for pid, args in postgres_processes(data_dir):
        if f"-D {data_dir}" in args:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
    for pid, _ in wait_postgres_gone(data_dir, 30.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def curl(*args: str) -> tuple[int, bytes]:
    """Run the curl binary; (HTTP status, body)."""
    marker = b"\n--http-status:"
    result = subprocess.run(
        ["curl", "-sS", "-w", marker.decode() + "%{http_code}", *args],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    body, _, status = result.stdout.rpartition(marker)
    return int(status), body


def curl_post_example(url: str, token: str) -> tuple[int, bytes]:
    """The README's curl command."""
    return curl(
        "-X",
        "POST",
        f"{url}/ledger/post",
        "-H",
        f"Authorization: Bearer {token}",
        "-H",
        "Idempotency-Key: readme-1",
        "-H",
        "Content-Type: application/json",
        "-d",
        "@docs/examples/journal.json",
    )


def curl_get_journal(url: str, token: str, journal_id: str) -> dict[str, Any]:
    status, body = curl(f"{url}/ledger/{journal_id}", "-H", f"Authorization: Bearer {token}")
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


@dataclass
class Newcomer:
    """The state the README path builds up across the tests of this module."""

    base: Path
    data_dir: Path
    token: str | None = None
    journal_id: str | None = None
    first_answer: bytes | None = None


@pytest.fixture(scope="module")
def newcomer() -> Iterator[Newcomer]:
    base = Path(tempfile.mkdtemp(prefix="ledger-newcomer-", dir="/tmp"))
    base.chmod(0o755)
    state = Newcomer(base, base / "data")
    try:
        yield state
    finally:
        stop_leftover_postgres(state.data_dir)
        shutil.rmtree(base, ignore_errors=True)


def test_first_start_post_with_curl_replay_read_then_sigterm(newcomer: Newcomer) -> None:
    example = json.loads(EXAMPLE.read_text())
    assert "journal_id" not in example, "replays of the example go by Idempotency-Key"
    server = Server(newcomer.data_dir, newcomer.base, run=1).start()
    try:
        server.wait_ready()
        assert (newcomer.data_dir / "postgres" / "PG_VERSION").read_text().strip() == "18"
        assert not (newcomer.data_dir / "POSTGRES_LOCATION").exists()

        stdout = server.wait_for_stdout(TOKEN_LINE)
        assert TOKEN_LINE in stdout, server.output()
        token_file = newcomer.data_dir / "api-tokens"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        spec = token_file.read_text().strip()
        token, _, role = spec.partition("=")
        assert role == "service" and len(token) >= 32, spec
        assert token in stdout.split(TOKEN_LINE, 1)[1], "the printed token is the one in api-tokens"
        newcomer.token = token

        status, first = curl_post_example(server.url, token)
        assert status == 200, first
        answer = json.loads(first)
        assert set(answer) == {"ok", "journal_id", "posted_at"}, answer
        assert answer["ok"] is True
        assert JOURNAL_ID.match(answer["journal_id"]), answer
        assert POSTED_AT.match(answer["posted_at"]), answer
        newcomer.journal_id, newcomer.first_answer = answer["journal_id"], first

        status, replay = curl_post_example(server.url, token)
        assert status == 200, replay
        assert replay == first, "a replay with the same Idempotency-Key answers the original body"

        read = curl_get_journal(server.url, token, answer["journal_id"])
        assert read["ok"] is True
        journal = read["journal"]
        assert journal["journal_id"] == answer["journal_id"]
        assert journal["posted_at"] == answer["posted_at"]
        assert journal["entries"] == example["entries"]
        assert journal["context"] == example["context"]
        assert re.fullmatch(r"[0-9a-f]{64}", read["audit"]["hash"]), read["audit"]

        code = server.stop(signal.SIGTERM)
        assert code == 0, f"SIGTERM: exit code {code} (None: still running after 60 s)\n{server.output()}"
        assert "ledger-node stopping" in server.stdout()
        left = wait_postgres_gone(newcomer.data_dir)
        assert not left, f"embedded PostgreSQL still running after the node exited: {left}"
    finally:
        stop_leftover_postgres(newcomer.data_dir)
        server.kill()


def test_second_start_keeps_the_token_and_the_journal_then_ctrl_c(newcomer: Newcomer) -> None:
    if newcomer.token is None or newcomer.journal_id is None:
        pytest.fail("the first start did not get as far as posting the example journal")
    token_file = newcomer.data_dir / "api-tokens"
    spec_before = token_file.read_text()
    server = Server(newcomer.data_dir, newcomer.base, run=2).start()
    try:
        server.wait_ready()
        stdout = server.wait_for_stdout("serving on")
        assert "serving on" in stdout, server.output()
        assert TOKEN_LINE not in stdout, "a restart reuses the stored token"
        assert token_file.read_text() == spec_before

        read = curl_get_journal(server.url, newcomer.token, newcomer.journal_id)
        assert read["journal"]["journal_id"] == newcomer.journal_id
        status, replay = curl_post_example(server.url, newcomer.token)
        assert (status, replay) == (200, newcomer.first_answer), "the key still answers after a restart"

        code = server.stop(signal.SIGINT)
        assert code == 0, f"SIGINT: exit code {code} (None: still running after 60 s)\n{server.output()}"
        left = wait_postgres_gone(newcomer.data_dir)
        assert not left, f"embedded PostgreSQL still running after the node exited: {left}"
    finally:
        stop_leftover_postgres(newcomer.data_dir)
        server.kill()


def test_check_on_the_stopped_embedded_node(newcomer: Newcomer) -> None:
    if newcomer.journal_id is None:
        pytest.fail("the first start did not get as far as posting the example journal")
    assert not postgres_processes(newcomer.data_dir), "the node is stopped"
    result = subprocess.run(
        [str(CLI), "check", "--data-dir", str(newcomer.data_dir)],
        cwd=REPO,
        env=newcomer_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check passed: 1 journals, 2 accounts" in result.stdout
    left = wait_postgres_gone(newcomer.data_dir)
    assert not left, f"`check` left its embedded PostgreSQL running: {left}"
