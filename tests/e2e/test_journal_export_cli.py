"""`ledger-node export-journal` (what the Kubernetes export CronJob runs) against a running node."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.node import TOKENS, NodeHarness, auth, journal

CLI = Path(sys.executable).with_name("ledger-node")
REPO = Path(__file__).resolve().parents[2]


def _export(url: str, token: str, out: Path) -> subprocess.CompletedProcess[str]:
    today = dt.datetime.now(dt.UTC).date()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}, "LEDGER_TOKEN": token}
    command = [str(CLI), "export-journal", "--url", url, "--from", today.isoformat()]
    command += ["--to", (today + dt.timedelta(days=1)).isoformat(), "--out", str(out)]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_export_writes_the_window_and_refuses_a_token_without_the_exports_role(
    node: NodeHarness, tmp_path: Path
) -> None:
    """Tried: a journal posted now, then `ledger-node export` for today with an auditor token (file
    written, {from} replaced, the journal's lines in it) and with a service token (403: exit 1, the
    node's error printed, no file)."""
    body = json.dumps(journal("exp-cli-1", "asset:exp-cli:a", "revenue:exp-cli:b", amount=4321)).encode()
    request = urllib.request.Request(
        f"{node.url}/ledger/post",
        data=body,
        method="POST",
        headers={**auth(), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    ok = _export(node.url, TOKENS["auditor"], tmp_path / "out" / "journal-{from}.csv")
    assert ok.returncode == 0, ok.stderr
    (written,) = (tmp_path / "out").iterdir()
    assert written.name == f"journal-{dt.datetime.now(dt.UTC).date().isoformat()}.csv"
    text = written.read_text()
    assert "exp-cli-1" in text and "asset:exp-cli:a" in text
    refused = _export(node.url, TOKENS["service"], tmp_path / "refused.csv")
    assert refused.returncode == 1
    assert "HTTP 403" in refused.stderr
    assert not (tmp_path / "refused.csv").exists()
