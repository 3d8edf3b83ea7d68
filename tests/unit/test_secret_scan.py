"""Repository hygiene: no private key or live credential is committed (issue 9 item 8).

Scans every file `git ls-files` lists for PEM private-key blocks, AWS access key ids and secret
keys, Stripe live keys (`sk_live_`, `rk_live_`), GitHub, Slack and npm tokens, and, in
configuration files (TOML, YAML, JSON, INI, .env, ...), values of secret-looking keys (`token`,
`secret`, `password`, `api_key`, ...) that look like real random tokens (Shannon entropy at least
3.5 bits per character, 20+ characters).

Allowlist: `.secret-scan-allowlist` at the repository root, one entry per line,
`PATH<TAB>KIND<TAB>REASON` (`PATH` an fnmatch pattern, `KIND` one of the kinds below or `*`).
Only fixtures that are clearly test keys belong there (generated for tests, never used anywhere,
the reason says so); the tests generate their keys at run time, so the list is empty today. A
stale entry (one that no longer matches a finding) fails the test too, so the list stays short.
Test keys such as Stripe's `sk_test_...` and `whsec_...` of the test server are not findings.
"""

from __future__ import annotations

import fnmatch
import math
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Final, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWLIST = REPO / ".secret-scan-allowlist"
MAX_BYTES = 2 * 1024 * 1024
ENTROPY_MIN = 3.5
CONFIG_SUFFIXES = (
    ".toml",
    ".yaml",
    ".yml",
    ".json",
    ".ini",
    ".cfg",
    ".conf",
    ".env",
    ".properties",
    ".tfvars",
)

# Built from parts so that this file does not match itself.
_BEGIN, _PRIVATE = "-----BEGIN", "PRIVATE KEY-----"
PATTERNS: dict[str, re.Pattern[str]] = {
    "private_key": re.compile(_BEGIN + r" (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?" + _PRIVATE),
    "aws_access_key_id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "aws_secret_access_key": re.compile(
        r"(?i)aws_?secret_?access_?key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"
    ),
    "stripe_live_key": re.compile(r"\b(?:sk|rk)_" + r"live_[0-9A-Za-z]{10,}"),
    "github_token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})"),
    "slack_token": re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{10,}"),
    "npm_token": re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"),
}
_CONFIG_SECRET = re.compile(
    r"(?i)(?:secret|token|passw(?:or)?d|api_?key|access_?key|private_?key|client_?secret)[A-Za-z0-9_.-]*"
    r"['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9+/_\-.=]{20,})"
)


class Finding(NamedTuple):
    path: str
    line: int
    kind: str


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def scan_text(path: str, text: str) -> list[Finding]:
    """Every finding in one file's text."""
    found: list[Finding] = []
    is_config = path.endswith(CONFIG_SUFFIXES) or Path(path).name.startswith(".env")
    for number, line in enumerate(text.splitlines(), 1):
        found += [Finding(path, number, kind) for kind, pattern in PATTERNS.items() if pattern.search(line)]
        if is_config:
            for match in _CONFIG_SECRET.finditer(line):
                value = match.group(1)
                if entropy(value) >= ENTROPY_MIN and not value.startswith(("sk_test_", "whsec_test")):
                    found.append(Finding(path, number, "config_secret"))
    return found


SKIPPED_DIRS: Final = frozenset(
    {".git", ".venv", ".ledger-data", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache",
     ".pytest_cache", ".hypothesis"}
)  # fmt: skip


def tracked_files() -> list[str]:
    """What `git ls-files` lists (the scan covers exactly what would be committed); outside a git
    checkout (an unpacked source archive), every file but local state and caches."""
    if not (REPO / ".git").exists():
        return sorted(
            str(f.relative_to(REPO))
            for f in REPO.rglob("*")
            if f.is_file() and not SKIPPED_DIRS.intersection(f.relative_to(REPO).parts)
        )
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def load_allowlist() -> list[tuple[str, str, str]]:
    if not ALLOWLIST.exists():
        return []
    entries = []
    for raw in ALLOWLIST.read_text().splitlines():
        if raw.strip() and not raw.startswith("#"):
            path, kind, reason = [*raw.split("\t"), "", ""][:3]
            assert reason.strip(), f"allowlist entry without a reason: {raw!r}"
            entries.append((path, kind, reason))
    return entries


def scan_repository() -> list[Finding]:
    found: list[Finding] = []
    for path in tracked_files():
        file = REPO / path
        if not file.is_file() or file.stat().st_size > MAX_BYTES:
            continue
        data = file.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (screenshots)
        found += scan_text(path, data.decode("utf-8", errors="replace"))
    return found


def test_no_secrets_in_tracked_files() -> None:
    """Tried: scan every tracked file -> no private key, live credential or high-entropy config
    secret outside the documented allowlist, and no allowlist entry that matches nothing."""
    allow = load_allowlist()
    found = scan_repository()

    def allowed(f: Finding) -> bool:
        return any(fnmatch.fnmatch(f.path, p) and k in (f.kind, "*") for p, k, _ in allow)

    offending = [f for f in found if not allowed(f)]
    assert not offending, "secrets committed (remove them, or allowlist clear test fixtures):\n" + "\n".join(
        f"{f.path}:{f.line}: {f.kind}" for f in offending
    )
    stale = [
        (p, k)
        for p, k, _ in allow
        if not any(fnmatch.fnmatch(f.path, p) and k in (f.kind, "*") for f in found)
    ]
    assert not stale, f"allowlist entries that match nothing: {stale}"


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("private_key", _BEGIN + " " + _PRIVATE),
        ("private_key", _BEGIN + " RSA " + _PRIVATE),
        ("private_key", _BEGIN + " OPENSSH " + _PRIVATE),
        ("aws_access_key_id", "key = AKIA" + "Q3EXAMPLEZ7K4BNM"),
        ("aws_secret_access_key", "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYz9kQ2m1Lp0"),
        ("stripe_live_key", "STRIPE_API_KEY=sk_" + "live_51HqL8mKZ3v2Jt9YbXc"),
        ("github_token", "token: ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
        ("slack_token", "xoxb-" + "1234567890-abcdefghij"),
    ],
)
def test_each_kind_of_secret_is_found(kind: str, text: str) -> None:
    """Tried: one line of each kind of secret -> the scanner reports that kind (a scanner that found
    nothing would make the repository test pass vacuously)."""
    assert kind in {f.kind for f in scan_text("notes.md", text)}


def test_config_secrets_need_entropy_and_a_config_file() -> None:
    """Tried: a random token under `api_key` in a YAML file -> config_secret; the same in Python
    source, a placeholder, and Stripe test keys -> nothing."""
    token = "api_key: " + "q8ZrT2vLx9WmB4nKc7YpH3sJ"
    assert [f.kind for f in scan_text("deploy/values.yaml", token)] == ["config_secret"]
    assert scan_text("node/config.py", token) == []
    assert scan_text("values.yaml", "password: changeme-changeme-changeme") == []
    assert scan_text("values.yaml", "api_key: sk_test_" + "51HqL8mKZ3v2Jt9YbXcAbC") == []
