"""Node configuration from the environment: the switches that change what an answer promises."""

from __future__ import annotations

import pytest

from node.config import ConfigError, NodeConfig


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


def test_payout_schedule_is_off_by_default_and_malformed_refuses_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tried: LEDGER_PAYOUT_SCHEDULE unset, empty, every:30, daily@02:00 -> kept as given (off when
    unset); "hourly" and daily@25:00 -> ConfigError naming the variable and the accepted forms."""
    monkeypatch.delenv("LEDGER_PAYOUT_SCHEDULE", raising=False)
    assert NodeConfig.from_env().payout_schedule == "off"
    for value, expected in (("", "off"), ("every:30", "every:30"), ("daily@02:00", "daily@02:00")):
        monkeypatch.setenv("LEDGER_PAYOUT_SCHEDULE", value)
        assert NodeConfig.from_env().payout_schedule == expected
    for value in ("hourly", "daily@25:00"):
        monkeypatch.setenv("LEDGER_PAYOUT_SCHEDULE", value)
        with pytest.raises(ConfigError, match=r"^LEDGER_PAYOUT_SCHEDULE: .*daily@HH:MM"):
            NodeConfig.from_env()


def test_clawback_reversals_switch_and_malformed_refuses_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: LEDGER_CLAWBACK_REVERSALS unset, on, 1, OFF -> off, on, on, off; "sometimes" ->
    ConfigError naming the variable."""
    monkeypatch.delenv("LEDGER_CLAWBACK_REVERSALS", raising=False)
    assert NodeConfig.from_env().clawback_reversals is False
    for value, expected in (("on", True), ("1", True), ("OFF", False)):
        monkeypatch.setenv("LEDGER_CLAWBACK_REVERSALS", value)
        assert NodeConfig.from_env().clawback_reversals is expected
    monkeypatch.setenv("LEDGER_CLAWBACK_REVERSALS", "sometimes")
    with pytest.raises(ConfigError, match=r"^LEDGER_CLAWBACK_REVERSALS must be on or off"):
        NodeConfig.from_env()
