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


@pytest.mark.parametrize(
    ("variable", "attribute", "off", "on"),
    [("LEDGER_SIGNING", "signing", "off", "on"), ("LEDGER_FAST_LANE", "fast_lane", "0", "1")],
)
def test_switches_are_on_unless_switched_off(
    monkeypatch: pytest.MonkeyPatch, variable: str, attribute: str, off: str, on: str
) -> None:
    """Tried: the variable unset, its "off" value and its "on" value."""
    monkeypatch.delenv(variable, raising=False)
    assert getattr(NodeConfig.from_env(), attribute) is True
    monkeypatch.setenv(variable, off)
    assert getattr(NodeConfig.from_env(), attribute) is False
    monkeypatch.setenv(variable, on)
    assert getattr(NodeConfig.from_env(), attribute) is True


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


def test_ray_shard_resource_defaults_and_malformed_values_refuse_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tried: LEDGER_RAY_SHARD_RESOURCE and _AMOUNT unset (ledger_shard, 1), set (gpu_free, 0.5),
    the name empty (no resource); then a name with a space, an amount of 0, -1, 1001 and "one"
    -> ConfigError naming the variable."""
    monkeypatch.delenv("LEDGER_RAY_SHARD_RESOURCE", raising=False)
    monkeypatch.delenv("LEDGER_RAY_SHARD_RESOURCE_AMOUNT", raising=False)
    config = NodeConfig.from_env()
    assert (config.ray_shard_resource, config.ray_shard_resource_amount) == ("ledger_shard", 1.0)
    monkeypatch.setenv("LEDGER_RAY_SHARD_RESOURCE", "gpu_free")
    monkeypatch.setenv("LEDGER_RAY_SHARD_RESOURCE_AMOUNT", "0.5")
    config = NodeConfig.from_env()
    assert (config.ray_shard_resource, config.ray_shard_resource_amount) == ("gpu_free", 0.5)
    monkeypatch.setenv("LEDGER_RAY_SHARD_RESOURCE", "")
    assert NodeConfig.from_env().ray_shard_resource == ""
    monkeypatch.setenv("LEDGER_RAY_SHARD_RESOURCE", "ledger shard")
    with pytest.raises(ConfigError, match="LEDGER_RAY_SHARD_RESOURCE"):
        NodeConfig.from_env()
    monkeypatch.setenv("LEDGER_RAY_SHARD_RESOURCE", "ledger_shard")
    for value in ("0", "-1", "1001", "one"):
        monkeypatch.setenv("LEDGER_RAY_SHARD_RESOURCE_AMOUNT", value)
        with pytest.raises(ConfigError, match="LEDGER_RAY_SHARD_RESOURCE_AMOUNT"):
            NodeConfig.from_env()


def test_shard_placement_asks_for_the_resource_and_spreads_only_when_named() -> None:
    """Tried: the Ray options for ledger_shard x1 and x0.25, and for no resource (a local cluster)."""
    from actors.runtime import shard_placement

    assert shard_placement("ledger_shard", 1.0) == {
        "resources": {"ledger_shard": 1.0},
        "scheduling_strategy": "SPREAD",
    }
    assert shard_placement("ledger_shard", 0.25)["resources"] == {"ledger_shard": 0.25}
    assert shard_placement("", 1.0) == {}


def test_serve_refuses_a_malformed_shard_resource_amount_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """Tried: `serve --ray-shard-resource-amount lots`; exit 2 naming the flag, before anything starts."""
    from node.cli import main

    assert main(["serve", "--ray-address", "127.0.0.1:1", "--ray-shard-resource-amount", "lots"]) == 2
    assert "--ray-shard-resource-amount must be a number" in capsys.readouterr().err


def test_export_defaults_to_yesterday_utc() -> None:
    """Tried: the journal export window (`ledger-node export-journal`) with neither bound, only
    --from, only --to, and both."""
    import datetime as dt

    from node.journal_export_cli import window

    today = dt.date(2026, 3, 1)
    assert window(None, None, today) == (dt.date(2026, 2, 28), today)
    assert window(dt.date(2026, 1, 5), None, today) == (dt.date(2026, 1, 5), dt.date(2026, 1, 6))
    assert window(None, dt.date(2026, 1, 5), today) == (dt.date(2026, 1, 4), dt.date(2026, 1, 5))
    assert window(dt.date(2026, 1, 1), dt.date(2026, 2, 1), today) == (
        dt.date(2026, 1, 1),
        dt.date(2026, 2, 1),
    )


def test_kafka_consumers_default_to_three_and_malformed_counts_refuse_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tried: KAFKA_BOOTSTRAP_SERVERS unset (no consumer at all); set with LEDGER_KAFKA_CONSUMERS
    unset, 1 and 8 -> 3, 1, 8 (batch 2000); 0, 65 and "two" -> ConfigError naming the variable."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert NodeConfig.from_env().kafka is None
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.delenv("LEDGER_KAFKA_CONSUMERS", raising=False)
    kafka = NodeConfig.from_env().kafka
    assert kafka is not None and (kafka.consumers, kafka.batch_max) == (3, 2000)
    for value, expected in (("1", 1), ("8", 8)):
        monkeypatch.setenv("LEDGER_KAFKA_CONSUMERS", value)
        kafka = NodeConfig.from_env().kafka
        assert kafka is not None and kafka.consumers == expected
    for value in ("0", "65", "two"):
        monkeypatch.setenv("LEDGER_KAFKA_CONSUMERS", value)
        with pytest.raises(ConfigError, match="LEDGER_KAFKA_CONSUMERS"):
            NodeConfig.from_env()
