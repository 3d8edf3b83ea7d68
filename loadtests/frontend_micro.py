"""In-process micro-benchmark of the front end's per-journal CPU cost on ``POST /ledger/post_batch``.

Usage::

    python -m loadtests.frontend_micro [--journals 8190] [--accounts 10000] [--shards 4]
                                       [--cross 0.0] [--repeat 15] [--gc tuned|default|off]

No node, no Ray, no PostgreSQL: it builds one batch body the way ``loadtests/bench.py`` does
(two-line USD journals over ``asset:acct-N`` / ``liability:acct-N``, N in 1..``--accounts``,
both accounts on one shard unless ``--cross`` asks for a share of cross-shard journals) and
times, ``--repeat`` times, each step the front end runs per journal of a batch:

``decode``
    ``api.ledger_routes.decode_batch``: decode the body and validate every journal (one
    submission or rejection each).
``route``
    ``api.posting.route``: journal id, request hash, destination per journal, and the items
    grouped per destination (``Poster.post`` without Ray).
``encode``
    ``actors.messages.ENCODER`` over each destination's items: the msgpack bytes of the calls.
``results``
    ``actors.messages.RESULTS`` over each destination's answer (one ok result with a 32-byte
    hash per journal, as a shard answers), and the results put back in request order.
``answer``
    ``api.ledger_routes.batch_answer`` plus the JSON response body (``api.envelope.ok``).
``audit``
    the ``ledger.post_batch`` audit payload and its canonical JSON (what the audit writer hashes).

It prints the best (and median) microseconds per journal of each step and their sum, in CPU
time of this process by default (``--clock wall`` for elapsed time), since the machine may be
shared with other work. The collector is set up as in production (``actors.gc_policy.tune_gc``:
freeze what start-up built, young threshold 50,000) unless ``--gc default`` or ``--gc off``; one
warm-up round runs first, so the account-id and slot caches are warm, as on a node under load.
Run it from the repository root (``loadtests`` is not an installed package).

Figures (2-core machine shared with other work, defaults, best of 15 rounds, CPU µs per journal),
before and after the batch fast paths (``JournalWire`` + ``journal_from_wire``, ``route``, struct
answers, ``gc=False`` structs): decode 4.6 -> 1.3, route 2.2 -> 1.4, encode 0.71 -> 0.56, results
0.17 -> 0.17, answer 0.54 -> 0.37, audit 0.39 -> 0.18; total 8.5 -> 4.0. With ``--cross 0.5``:
9.8 -> 4.5; with ``--gc default``: 11.8 -> 4.2.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from actors.gc_policy import tune_gc
from actors.messages import ENCODER, RESULTS, Result
from api.audit_log import post_batch_payload
from api.envelope import ok
from api.ledger_routes import batch_answer, decode_batch
from api.posting import Submission, route
from loadtests.bench import account_pairs, random_journal
from sharding.slots import SlotMap, even_slot_map
from signer.canonical import canonical

PRINCIPAL = "service:0123456789ab"
POSTED_AT = "2026-11-22T00:41:01.123456Z"
PHASES = ("decode", "route", "encode", "results", "answer", "audit")


def build_body(journals: int, accounts: int, shards: int, cross: float, seed: int) -> bytes:
    """A ``post_batch`` body of ``journals`` two-line journals, ``cross`` of them cross-shard."""
    rng = random.Random(seed)
    single = account_pairs(rng, accounts, shards, cross=False)
    spanning = account_pairs(rng, accounts, shards, cross=True) if cross > 0 else single
    items = [
        random_journal(rng, f"b-micro-{i:010d}", spanning if rng.random() < cross else single)
        for i in range(journals)
    ]
    return msgspec.json.encode({"journals": items})


def shard_answers(groups: dict[int, tuple[list[int], list[Any]]]) -> dict[int, bytes]:
    """What each destination answers: one ok result per item, msgpack-encoded like the actors do."""
    digest = bytes(range(32))
    return {
        dest: ENCODER.encode([Result(item.journal_id, True, POSTED_AT, hash=digest) for item in items])
        for dest, (_, items) in groups.items()
    }


def one_round(body: bytes, shard_of: Callable[[str], int], clock: Callable[[], float]) -> dict[str, float]:
    """Run every step once over the body; seconds per step."""
    times: dict[str, float] = {}
    t0 = clock()
    subs = decode_batch(body, PRINCIPAL, None).subs
    t1 = clock()
    valid = [s for s in subs if isinstance(s, Submission)]
    groups = route(valid, shard_of)
    t2 = clock()
    payloads = [ENCODER.encode(items) for _, items in groups.values()]
    t3 = clock()
    answers = shard_answers(groups)
    t4 = clock()
    decoded = {dest: RESULTS.decode(raw) for dest, raw in answers.items()}
    t5 = clock()
    posted: list[Result | None] = [None] * len(valid)
    for dest, (indexes, _) in groups.items():
        for index, result in zip(indexes, decoded[dest], strict=True):
            posted[index] = result
    t6 = clock()
    answer = batch_answer(subs, [r for r in posted if r is not None])
    response = ok(results=answer.items)
    t7 = clock()
    audit_bytes = canonical(post_batch_payload(answer.posted, len(subs), answer.hashes))
    t8 = clock()
    if len(valid) != len(subs) or not payloads or not response.body or not audit_bytes:
        raise SystemExit("every journal of the benchmark batch should be valid and posted")
    times["decode"] = t1 - t0
    times["route"] = t2 - t1
    times["encode"] = t3 - t2
    times["results"] = (t5 - t4) + (t6 - t5)
    times["answer"] = t7 - t6
    times["audit"] = t8 - t7
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.frontend_micro", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--journals", type=int, default=8190, help="journals in the batch (default 8190)")
    p.add_argument("--accounts", type=int, default=10_000, help="accounts per type (default 10000)")
    p.add_argument("--shards", type=int, default=4, help="shards of the even slot map (default 4)")
    p.add_argument("--cross", type=float, default=0.0, help="share of cross-shard journals (default 0)")
    p.add_argument("--repeat", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--seed", type=int, default=0xB47C, help="seed of the journal generator")
    p.add_argument(
        "--gc",
        choices=("tuned", "default", "off"),
        default="tuned",
        help="tuned: as in production (actors.gc_policy.tune_gc); default: CPython's; off: disabled",
    )
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this process's CPU time (steadier on a shared machine); wall: elapsed time",
    )
    a = p.parse_args(argv)
    if a.journals < 1 or a.repeat < 1 or not 0.0 <= a.cross <= 1.0 or a.accounts < 2:
        p.error("--journals, --repeat >= 1, --accounts >= 2, 0 <= --cross <= 1")
    return a


def main(argv: list[str] | None = None) -> None:
    """Build the body, set up the collector, warm up, time, print µs per journal per step."""
    a = parse_args(argv)
    body = build_body(a.journals, a.accounts, a.shards, a.cross, a.seed)
    shard_of = SlotMap(even_slot_map(a.shards)).shard_of
    if a.gc == "tuned":
        tune_gc()
    elif a.gc == "off":
        gc.disable()
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    one_round(body, shard_of, clock)  # warm-up: caches filled, as on a node under load
    rounds = [one_round(body, shard_of, clock) for _ in range(a.repeat)]
    per = 1e6 / a.journals
    print(
        f"{a.journals} journals, {a.accounts} accounts, {a.shards} shards, cross {a.cross:.2f}, "
        f"gc {a.gc}, {a.clock} clock, {a.repeat} rounds, body {len(body)} bytes"
    )
    print(f"{'step':<8} {'best us/journal':>16} {'median':>8}")
    for phase in PHASES:
        values = [r[phase] * per for r in rounds]
        print(f"{phase:<8} {min(values):>16.3f} {statistics.median(values):>8.3f}")
    totals = [sum(r.values()) * per for r in rounds]
    print(f"{'total':<8} {min(totals):>16.3f} {statistics.median(totals):>8.3f}")


if __name__ == "__main__":
    main()
