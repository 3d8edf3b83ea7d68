"""`loadtests.cpu_meter.spent_between`: CPU per group between two readings, process by process.

What was tried: a backend a pool closed during the phase (it must not take its whole history off
the `postgres` group, as subtracting totals did: the kafka benchmark once printed -404.5 µs per
event for the `api` pool), one it opened (counted from zero), a pid reused by a new process (a
different start time: a new process), and a process in two groups (a backend and its pool).
"""

from __future__ import annotations

from loadtests.cpu_meter import GROUPS, spent_between


def test_per_process_deltas() -> None:
    before = {
        (10, 1.0): (("front end",), 5.0),
        (20, 1.0): (("postgres", "pg api"), 7.0),  # closed during the phase
        (30, 1.0): (("postgres", "pg api"), 2.0),
        (40, 1.0): (("postgres", "pg shard"), 9.0),  # pid 40 ends; a new process reuses the pid
    }
    after = {
        (10, 1.0): (("front end",), 5.5),
        (30, 1.0): (("postgres", "pg api"), 2.25),
        (31, 2.0): (("postgres", "pg api"), 0.5),  # opened during the phase
        (40, 3.0): (("postgres", "pg shard"), 0.125),
    }
    spent = spent_between(before, after)
    assert spent["front end"] == 0.5
    assert spent["pg api"] == 0.75
    assert spent["pg shard"] == 0.125
    assert spent["postgres"] == 0.875
    assert all(spent[group] >= 0 for group in GROUPS)
