"""The bank test, CI form (issue 10): a real node on a PostgreSQL the test owns, faults from a seeded
nemesis, and the checker of `tests/support/bank.py`. `python -m loadtests.bank` is the long form.

`LEDGER_BANK_SEEDS=7,8,9` picks the seeds and `LEDGER_BANK_DURATION_S` the traffic time per seed;
every seed injects every fault kind at least once whatever the duration. A failing seed's summary
line says how to replay it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.bank import FAULT_KINDS, BankConfig, BankEnvironment, run_bank, run_outage_probe

SEEDS = [int(s) for s in os.environ.get("LEDGER_BANK_SEEDS", "1,2,3").split(",")]
DURATION_S = float(os.environ.get("LEDGER_BANK_DURATION_S", "6"))


@pytest.fixture(scope="module")
def bank_env(ray_cluster: None) -> Iterator[BankEnvironment]:
    """The owned PostgreSQL and the fault proxy, shared by the seeds (each seed gets its own node and
    database)."""
    env = BankEnvironment()
    yield env
    env.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SEEDS)
def test_bank_under_faults(bank_env: BankEnvironment, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Tried: 8 writers post random transfers between 16 funded wallets (USD and EUR, half of them
    overdraft-guarded, 40% cross-shard) and 2 readers read balances and page the journal stream, while
    the seeded nemesis kills shard actors, the coordinator and the signer, makes the signer fail,
    restarts the node, resets / slows / blackholes its PostgreSQL connections through the fault proxy
    and restarts the owned PostgreSQL -> every acknowledged journal stored once and whole, nothing
    refused stored, no partial cross-shard journal, every balance read a prefix of the commit order
    (monotonic per reader), guarded wallets never negative, per-currency zero sum, the stream exactly
    once, every writer lock held again, no 500 INTERNAL_ERROR, `ledger-node check` and the proof pass,
    and every indeterminate answer resolved by retrying the same journal id."""
    result = run_bank(bank_env, BankConfig(seed=seed, duration_s=DURATION_S))
    with capsys.disabled():
        print(f"\n{result.summary()}\nfault schedule (s, kind, hold s): {result.fault_log}")
    assert result.anomalies == [], f"{result.summary()}\n" + "\n".join(result.anomalies)
    assert set(result.faults) == set(FAULT_KINDS), result.faults
    assert result.unresolved == 0, result.summary()
    assert result.acknowledged > 100 and result.refused > 0, result.summary()
    assert result.balance_reads > 0 and result.stream_pages > 0, result.summary()


@pytest.mark.timeout(180)
def test_outage_answers_503_and_writers_take_their_locks_again(bank_env: BankEnvironment) -> None:
    """Tried: a node whose PostgreSQL connections go through the fault proxy; reset every connection
    and refuse new ones for 2 s while reading a balance, then restore and post a journal on every
    shard plus a cross-shard one -> the read during the outage answers 503 SERVICE_UNAVAILABLE with
    `retryable: true` (never 500), every journal after it is acknowledged, and every single writer
    (4 shards, the coordinator, the audit writer, the signer) holds its advisory lock again in
    PostgreSQL (the outage released them with their connections)."""
    result = run_outage_probe(bank_env)
    assert result["during"][0] == 503, result
    assert result["during"][1]["error"]["code"] == "SERVICE_UNAVAILABLE", result
    assert result["during"][1]["error"]["details"]["retryable"] is True, result
    assert result["anomalies"] == [], result
