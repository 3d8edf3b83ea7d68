"""Node configuration from the environment: the switches that change what an answer promises."""

from __future__ import annotations

import pytest

from node.config import NodeConfig


def test_audit_wait_defaults_to_answering_before_the_audit_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: no LEDGER_AUDIT_WAIT, then 1, then 0 and a stray value (only "1" turns it on)."""
    monkeypatch.delenv("LEDGER_AUDIT_WAIT", raising=False)
    assert NodeConfig.from_env().audit_wait is False
    monkeypatch.setenv("LEDGER_AUDIT_WAIT", "1")
    assert NodeConfig.from_env().audit_wait is True
    for value in ("0", "yes"):
        monkeypatch.setenv("LEDGER_AUDIT_WAIT", value)
        assert NodeConfig.from_env().audit_wait is False


def test_signing_is_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: LEDGER_SIGNING unset, "off" and "on"."""
    monkeypatch.delenv("LEDGER_SIGNING", raising=False)
    assert NodeConfig.from_env().signing is True
    monkeypatch.setenv("LEDGER_SIGNING", "off")
    assert NodeConfig.from_env().signing is False
    monkeypatch.setenv("LEDGER_SIGNING", "on")
    assert NodeConfig.from_env().signing is True
