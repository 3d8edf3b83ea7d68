"""Isolated SoftHSM2 tokens for tests (``make test`` installs the softhsm2 Debian package).

SoftHSM reads ``SOFTHSM2_CONF`` and scans its token directory once, when the library is
initialised, and python-pkcs11 caches ``pkcs11.lib(path)`` per process. So this module keeps ONE
temporary token directory and config per process (``SOFTHSM2_CONF`` is set in ``os.environ`` the
first time), and tokens are cached by label: `session_token` returns the same token for the same
label for the whole test session. A token initialised after the first ``pkcs11.lib()`` call is not
visible to that process, so create every token a session needs before opening any of them —
simplest is one token per session and a distinct key label per test.
The directory (whose token files hold the test keys) is removed when the process exits.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MODULE_CANDIDATES: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
DEFAULT_LABEL: Final = "ledger-test"
DEFAULT_PIN: Final = "test-user-pin-1234"
DEFAULT_SO_PIN: Final = "test-so-pin-5678"

_lock = threading.Lock()
_tokens: dict[str, SoftHsmToken] = {}
_state: dict[str, Path] = {}


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised test token and the settings to reach it (``env`` suits a node subprocess)."""

    module_path: str
    token_label: str
    pin: str
    conf_path: Path
    env: dict[str, str]


class SoftHsmUnavailable(RuntimeError):
    """softhsm2 is not installed (run ``make system-deps``)."""


def module_path() -> str:
    """The SoftHSM2 PKCS#11 module (``SOFTHSM2_MODULE`` overrides the Debian locations)."""
    override = os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override
    for pattern in MODULE_CANDIDATES:
        for candidate in sorted(glob.glob(pattern)):
            if os.path.isfile(candidate):
                return candidate
    raise SoftHsmUnavailable("libsofthsm2.so not found: install the softhsm2 package (make system-deps)")


def _util() -> str:
    """Path of softhsm2-util."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmUnavailable("softhsm2-util not found: install the softhsm2 package (make system-deps)")
    return util


def _conf_path() -> Path:
    """The process-wide config (written and exported in SOFTHSM2_CONF on first use)."""
    conf = _state.get("conf")
    if conf is not None:
        return conf
    root = Path(tempfile.mkdtemp(prefix="ledger-softhsm-"))
    atexit.register(shutil.rmtree, root, True)
    tokens = root / "tokens"
    tokens.mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    _state["conf"] = conf
    return conf


def _init_token(conf: Path, label: str, pin: str, so_pin: str) -> None:
    """Run ``softhsm2-util --init-token --free`` against `conf` (PINs are not echoed on failure)."""
    cmd = [_util(), "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin]
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed for {label!r}: {result.stderr.strip()}")


def create_token(label: str, pin: str = DEFAULT_PIN, so_pin: str = DEFAULT_SO_PIN) -> SoftHsmToken:
    """Initialise a new token named `label` in this process's token directory."""
    module = module_path()
    conf = _conf_path()
    _init_token(conf, label, pin, so_pin)
    env = {
        "SOFTHSM2_CONF": str(conf),
        "LEDGER_PKCS11_MODULE": module,
        "LEDGER_PKCS11_TOKEN": label,
        "LEDGER_PKCS11_PIN": pin,
    }
    return SoftHsmToken(module, label, pin, conf, env)


def session_token(label: str = DEFAULT_LABEL) -> SoftHsmToken:
    """The token named `label`, created on the first call and shared for the rest of the process."""
    with _lock:
        token = _tokens.get(label)
        if token is None:
            token = _tokens[label] = create_token(label)
        return token
