"""Seeded discrete-event simulation of cross-shard two-phase commit over a faulty network.

One coordinator and 2-5 participant shards run the protocol of `sharding.twophase`, whose state machines
take every decision.  The network drops, duplicates and reorders messages; the coordinator and the
participants crash and restart at any step (and on purpose at the delicate ones).  After the faulty phase
a fault-free tail must bring every tx to DONE.  Checked on every seed: atomicity, applied iff COMMIT was
logged, no double application, no guarded account ever negative in durable state, conservation of money,
no reservation left over.

A decision carries no lines (as on the node's wire): a COMMIT applies the part the participant
reserved, so every COMMIT that applies must find its reservation.

The durable state is the node's (migration 0023): a log row per unfinished tx that never changes
(PREPARING, "maybe prepared"), a commit record (the journal row) written by a COMMIT decision and nothing
for an ABORT, and the row deleted once every participant acknowledged.

Replay one seed:  LEDGER_SIM_SEED=1234 pytest tests/sim -k replay
Run more seeds:   LEDGER_SIM_SEEDS=5000 pytest tests/sim
"""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from sharding.twophase import (
    CoordinatorTx,
    Decision,
    ParticipantTx,
    PartVote,
    Phase,
    ProtocolViolation,
    logged_decision,
    reservations_to_reload,
    stale_reservations,
)

Part = tuple[tuple[str, int], ...]
MsgKind = Literal["prepare", "vote", "decision", "ack"]

DEFAULT_SEEDS = 250
MAX_FAULTY_STEPS = 400
MAX_TAIL_STEPS = 20_000


class SimFailure(AssertionError):
    """A simulation check failed."""


def _ensure(condition: bool, message: str) -> None:
    """Fail the simulation with `message` unless `condition` holds."""
    if not condition:
        raise SimFailure(message)


@dataclass(frozen=True, slots=True)
class Msg:
    """A network message; `shard` is the participant it concerns (sender of votes/acks, target otherwise)."""

    kind: MsgKind
    txid: str
    shard: int
    yes: bool = False
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault rates of one seed."""

    drop: float
    dup: float
    reorder: bool
    coord_crash: float
    part_crash: float
    targeted_crash: float
    timeout: float


@dataclass(slots=True)
class LogRow:
    """Durable log row of an unfinished tx (SQL table ``xtx``): always PREPARING, deleted when DONE."""

    phase: Phase
    journal: dict[int, Part]


@dataclass(slots=True)
class Shard:
    """A participant: durable balances + applied set, volatile tx states + reservations."""

    sid: int
    guarded: frozenset[str]
    balances: dict[str, int]
    applied: set[str] = field(default_factory=set)
    duplicate_applies: int = 0
    txs: dict[str, ParticipantTx] = field(default_factory=dict)
    reserved: dict[str, Part] = field(default_factory=dict)

    def fits(self, txid: str, part: Part) -> bool:
        """Overdraft guard: guarded accounts stay >= 0 counting other txs' reserved debits."""
        for account, delta in part:
            if delta >= 0 or account not in self.guarded:
                continue
            held = sum(
                d
                for other, p in self.reserved.items()
                if other != txid
                for a, d in p
                if a == account and d < 0
            )
            if self.balances[account] + held + delta < 0:
                return False
        return True

    def sync(self, tx: ParticipantTx, part: Part) -> None:
        """Make the reservation table agree with the state machine."""
        if tx.holds_reservation:
            self.reserved[tx.txid] = part
        else:
            self.reserved.pop(tx.txid, None)

    def known(self, txid: str) -> ParticipantTx | None:
        """The volatile tx state, rebuilt from the durable store if the part was applied."""
        tx = self.txs.get(txid)
        if tx is None and txid in self.applied:
            tx = self.txs[txid] = ParticipantTx.applied(txid)
        return tx

    def apply(self, txid: str, part: Part) -> None:
        """Durably apply a part; the unique key on txid rejects a second application."""
        if txid in self.applied:
            self.duplicate_applies += 1
            return
        self.applied.add(txid)
        for account, delta in part:
            self.balances[account] += delta
            negative = account in self.guarded and self.balances[account] < 0
            _ensure(not negative, f"guarded {account} negative ({self.balances[account]}) after {txid}")

    def restart(self, log: dict[str, LogRow]) -> int:
        """Lose volatile state, re-reserve what the log says; returns the number of reloaded reservations."""
        self.txs, self.reserved = {}, {}
        rows = [
            (txid, r.phase, frozenset(r.journal), frozenset({self.sid} if txid in self.applied else ()))
            for txid, r in log.items()
        ]
        for txid in reservations_to_reload(self.sid, rows):
            self.txs[txid] = ParticipantTx.reload(txid)
            self.reserved[txid] = log[txid].journal[self.sid]
        return len(self.reserved)

    def sweep(self, log: dict[str, LogRow]) -> None:
        """Release reservations of txs the log shows finished."""
        phase_of = {txid: log[txid].phase for txid in self.reserved if txid in log}
        for txid in stale_reservations(list(self.reserved), phase_of):
            tx = self.txs[txid]
            tx.on_abort()
            self.sync(tx, self.reserved[txid])


@dataclass(slots=True)
class World:
    """Everything of one seeded run."""

    rng: random.Random
    faults: Faults
    shards: list[Shard]
    journals: dict[str, dict[int, Part]]
    initial: dict[str, int]
    queue: list[str]
    log: dict[str, LogRow] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)  # commit records (the journal rows), durable
    logged: set[str] = field(default_factory=set)  # every tx ever logged
    presumed_aborted: set[str] = field(default_factory=set)
    mem: dict[str, CoordinatorTx] = field(default_factory=dict)
    batch: list[str] = field(default_factory=list)
    pending: dict[str, Decision] = field(default_factory=dict)
    outbox: list[Msg] = field(default_factory=list)
    network: list[Msg] = field(default_factory=list)
    faulty: bool = True
    stats: Counter[str] = field(default_factory=Counter)
    trace: deque[str] = field(default_factory=lambda: deque(maxlen=25))

    # ---- durable log -------------------------------------------------------------------------------
    def write_decision(self, txid: str, decision: Decision) -> None:
        """Make a decision durable: COMMIT writes the commit record, ABORT writes nothing (presumed abort)."""
        _ensure(txid in self.log, f"deciding {txid}, which is not logged")
        if decision == Decision.COMMIT:
            _ensure(txid not in self.presumed_aborted, f"{txid} committed after recovery presumed it aborted")
            self.committed.add(txid)

    def forget(self, txid: str) -> None:
        """Every participant acknowledged: the tx leaves the log."""
        del self.log[txid]

    # ---- coordinator -------------------------------------------------------------------------------
    def submit(self) -> None:
        """The client hands the next journal to the coordinator's intent batch."""
        self.batch.append(self.queue.pop(0))

    def log_intents(self) -> None:
        """Durably log the batch (PREPARING + journal), then queue the PREPAREs."""
        for txid in self.batch:
            journal = self.journals[txid]
            _ensure(txid not in self.log and txid not in self.committed, f"{txid} logged twice")
            self.log[txid] = LogRow(Phase.PREPARING, journal)
            self.logged.add(txid)
            self.mem[txid] = CoordinatorTx(txid, frozenset(journal))
            self.outbox.extend(Msg("prepare", txid, s) for s in sorted(journal))
        self.batch = []
        self.maybe_targeted_crash("after-intent")

    def log_decisions(self) -> None:
        """Durably log the reached decisions (the commit point), then queue them for sending."""
        for txid, decision in self.pending.items():
            self.write_decision(txid, decision)
            self.mem[txid].decided(decision)
            self.queue_decision(self.mem[txid], self.mem[txid].participants)
            self.stats[f"decided-{decision}"] += 1
        self.pending = {}
        self.maybe_targeted_crash("after-decision")

    def queue_decision(self, ctx: CoordinatorTx, shards: frozenset[int]) -> None:
        """Queue the durable decision of `ctx` for `shards`."""
        self.outbox.extend(Msg("decision", ctx.txid, s, decision=ctx.decision) for s in sorted(shards))

    def on_vote(self, msg: Msg) -> None:
        """A vote reached the coordinator."""
        ctx = self.mem.get(msg.txid)
        if ctx is not None and (decision := ctx.on_vote(msg.shard, msg.yes)) is not None:
            self.pending[msg.txid] = decision
            self.maybe_targeted_crash("after-votes")

    def on_ack(self, msg: Msg) -> None:
        """An acknowledgement reached the coordinator; log DONE when every participant acked."""
        ctx = self.mem.get(msg.txid)
        if ctx is not None and ctx.on_ack(msg.shard):
            self.forget(msg.txid)
            del self.mem[msg.txid]

    def tick(self) -> None:
        """Coordinator timer: time out or resend PREPAREs, resend decisions to unacked participants."""
        for ctx in list(self.mem.values()):
            if ctx.phase == Phase.PREPARING and ctx.txid not in self.pending:
                self.tick_preparing(ctx)
            elif ctx.decision is not None:
                self.queue_decision(ctx, ctx.unacked())

    def tick_preparing(self, ctx: CoordinatorTx) -> None:
        """A missing vote either times out (== NO) or its PREPARE is resent."""
        for shard in sorted(ctx.missing_votes()):
            if self.faulty and self.rng.random() < self.faults.timeout:
                self.stats["timeouts"] += 1
                decision = ctx.on_failure(shard)
                if decision is not None:
                    self.pending[ctx.txid] = decision
                return
            self.outbox.append(Msg("prepare", ctx.txid, shard))

    def crash_coordinator(self) -> None:
        """Lose all volatile coordinator state and recover from the log (presumed abort)."""
        self.stats["coord-crashes"] += 1
        self.queue = self.batch + self.queue
        self.mem, self.batch, self.pending, self.outbox = {}, [], {}, []
        for txid, row in self.log.items():
            decision = logged_decision(committed=txid in self.committed)
            ctx = CoordinatorTx.recovered(txid, frozenset(row.journal), Phase(decision.value))
            if decision == Decision.ABORT:
                self.presumed_aborted.add(txid)
                self.stats["presumed-aborts"] += 1
            self.mem[txid] = ctx
            self.queue_decision(ctx, ctx.participants)

    # ---- participants ------------------------------------------------------------------------------
    def on_prepare(self, shard: Shard, msg: Msg) -> None:
        """PREPARE reached a participant: vote, reserving on YES."""
        part = self.journals[msg.txid][shard.sid]
        tx = shard.known(msg.txid)
        if tx is None:
            tx = shard.txs[msg.txid] = ParticipantTx(msg.txid)
        vote = tx.on_prepare(shard.fits(msg.txid, part))
        shard.sync(tx, part)
        self.network.append(Msg("vote", msg.txid, shard.sid, yes=vote == PartVote.YES))
        self.stats[f"vote-{vote}{'-reloaded' if tx.reloaded else ''}"] += 1
        if vote == PartVote.YES:
            self.maybe_targeted_crash("after-yes", shard)

    def on_decision(self, shard: Shard, msg: Msg) -> None:
        """COMMIT/ABORT reached a participant: apply or release, then acknowledge."""
        part = self.journals[msg.txid][shard.sid]
        tx = shard.known(msg.txid)
        if tx is None:
            tx = shard.txs[msg.txid] = (
                ParticipantTx.tombstone(msg.txid)
                if msg.decision == Decision.ABORT
                else (ParticipantTx(msg.txid))
            )
        if msg.decision == Decision.COMMIT:
            if tx.state == "refused":
                self.stats["commit-after-reloaded-no"] += 1
            if tx.on_commit():
                # A COMMIT carries no lines: the participant applies the part it reserved.
                reserved = shard.reserved.get(msg.txid)
                _ensure(reserved is not None, f"shard {shard.sid} commits {msg.txid} without reservation")
                _ensure(reserved == part, f"shard {shard.sid} reserved another part of {msg.txid}")
                assert reserved is not None
                shard.apply(msg.txid, reserved)
        else:
            tx.on_abort()
        shard.sync(tx, part)
        self.network.append(Msg("ack", msg.txid, shard.sid))

    def crash_participant(self, shard: Shard) -> None:
        """Lose a participant's volatile state and reload reservations from the log."""
        self.stats["part-crashes"] += 1
        if shard.restart(self.log):
            self.stats["reloads"] += 1

    def maybe_targeted_crash(self, point: str, shard: Shard | None = None) -> None:
        """Crash at a delicate point of the protocol with the seed's targeted-crash rate."""
        if not self.faulty or self.rng.random() >= self.faults.targeted_crash:
            return
        self.stats[f"crash-{point}"] += 1
        self.trace.append(f"targeted crash {point} {shard.sid if shard else 'coordinator'}")
        if shard is None:
            self.crash_coordinator()
        else:
            self.crash_participant(shard)

    # ---- network -----------------------------------------------------------------------------------
    def send(self) -> None:
        """Move the coordinator's next outgoing message onto the network."""
        self.network.append(self.outbox.pop(0))

    def deliver(self) -> None:
        """Deliver one message: maybe dropped, maybe duplicated (a copy stays), out of order if reordering."""
        index = self.rng.randrange(len(self.network)) if self.faults.reorder or not self.faulty else 0
        msg = self.network[index]
        if not (self.faulty and self.rng.random() < self.faults.dup):
            del self.network[index]
        if self.faulty and self.rng.random() < self.faults.drop:
            self.trace.append(f"drop {msg}")
            return
        self.trace.append(f"deliver {msg}")
        if msg.kind == "vote":
            self.on_vote(msg)
        elif msg.kind == "ack":
            self.on_ack(msg)
        elif msg.kind == "prepare":
            self.on_prepare(self.shards[msg.shard], msg)
        else:
            self.on_decision(self.shards[msg.shard], msg)

    # ---- driving -----------------------------------------------------------------------------------
    def quiescent(self) -> bool:
        """Nothing left to do: all submitted, nothing in flight, every logged tx DONE."""
        busy = self.queue or self.batch or self.pending or self.outbox or self.network
        return not busy and not self.log

    def faulty_step(self) -> None:
        """One random step of the faulty phase."""
        f = self.faults
        actions: list[tuple[str, float]] = [
            ("submit", 1.0 if self.queue else 0.0),
            ("log_intents", 0.7 if self.batch else 0.0),
            ("log_decisions", 0.7 if self.pending else 0.0),
            ("send", 3.0 if self.outbox else 0.0),
            ("deliver", 5.0 if self.network else 0.0),
            ("tick", 0.4),
            ("sweep", 0.1),
            ("crash_coordinator", f.coord_crash),
            ("crash_participant", f.part_crash),
        ]
        names = [name for name, weight in actions if weight > 0]
        name = self.rng.choices(names, [weight for _, weight in actions if weight > 0])[0]
        self.trace.append(name)
        self.run_action(name)

    def run_action(self, name: str) -> None:
        """Perform the named action."""
        if name == "sweep":
            self.rng.choice(self.shards).sweep(self.log)
        elif name == "crash_participant":
            self.crash_participant(self.rng.choice(self.shards))
        else:
            getattr(self, name)()

    def tail_step(self) -> None:
        """One step of the fault-free tail: always make progress, timers only once the network is idle."""
        for name, enabled in (
            ("submit", self.queue),
            ("log_intents", self.batch),
            ("log_decisions", self.pending),
            ("send", self.outbox),
            ("deliver", self.network),
        ):
            if enabled:
                self.run_action(name)
                return
        self.tick()


def build_world(seed: int) -> World:
    """Draw shards, accounts, funds, transactions and fault rates from the seed."""
    rng = random.Random(seed)
    n_shards = rng.randint(2, 5)
    shards: list[Shard] = []
    for sid in range(n_shards):
        accounts = [f"s{sid}a{i}" for i in range(rng.randint(1, 3))]
        guarded = frozenset(a for a in accounts if rng.random() < 0.7)
        shards.append(Shard(sid, guarded, {a: rng.randint(0, 60) for a in accounts}))
    journals = {f"tx{i}": make_journal(rng, shards) for i in range(rng.randint(3, 12))}
    faults = Faults(
        drop=rng.choice([0.0, 0.05, 0.2]),
        dup=rng.choice([0.0, 0.1, 0.3]),
        reorder=rng.random() < 0.7,
        coord_crash=rng.choice([0.0, 0.05, 0.2]),
        part_crash=rng.choice([0.0, 0.05, 0.2]),
        targeted_crash=rng.choice([0.0, 0.1, 0.3]),
        timeout=rng.choice([0.0, 0.05, 0.3]),
    )
    initial = {a: b for s in shards for a, b in s.balances.items()}
    return World(rng, faults, shards, journals, initial, list(journals))


def make_journal(rng: random.Random, shards: list[Shard]) -> dict[int, Part]:
    """A balanced journal moving money along a chain of 2-3 distinct shards (plus maybe a back-move)."""
    chain = rng.sample(range(len(shards)), rng.randint(2, min(3, len(shards))))
    moves = list(itertools.pairwise(chain))
    if rng.random() < 0.3:
        moves.append((chain[-1], chain[0]))
    lines: dict[int, Counter[str]] = {sid: Counter() for sid in chain}
    for src, dst in moves:
        amount = rng.randint(1, 40)
        lines[src][rng.choice(list(shards[src].balances))] -= amount
        lines[dst][rng.choice(list(shards[dst].balances))] += amount
    return {sid: tuple(sorted(c.items())) for sid, c in lines.items()}


def check_final(world: World) -> None:
    """Check the durable state at quiescence."""
    _ensure(world.logged == set(world.journals), "some submitted tx was never logged")
    _ensure(not world.log, f"txs left in the log: {sorted(world.log)}")
    expected = Counter[str]()
    for txid, journal in world.journals.items():
        applied_by = {s.sid for s in world.shards if txid in s.applied}
        _ensure(applied_by in (set(), set(journal)), f"{txid} applied by {applied_by} of {set(journal)}")
        committed = txid in world.committed
        _ensure(bool(applied_by) == committed, f"{txid}: applied={bool(applied_by)}, committed {committed}")
        if committed:
            for part in journal.values():
                expected.update(dict(part))
    for shard in world.shards:
        _ensure(
            shard.duplicate_applies == 0, f"shard {shard.sid}: {shard.duplicate_applies} duplicate applies"
        )
        shard.sweep(world.log)
        _ensure(not shard.reserved, f"shard {shard.sid}: reservations left {sorted(shard.reserved)}")
    for shard in world.shards:
        for account, balance in shard.balances.items():
            want = world.initial[account] + expected[account]
            _ensure(balance == want, f"{account}: balance {balance}, committed parts say {want}")
    total = sum(sum(s.balances.values()) for s in world.shards)
    _ensure(
        total == sum(world.initial.values()), f"money not conserved: {sum(world.initial.values())} -> {total}"
    )


def run_seed(seed: int) -> Counter[str]:
    """Run one seed to quiescence and check it; returns statistics."""
    world = build_world(seed)
    try:
        for _ in range(world.rng.randint(50, MAX_FAULTY_STEPS)):
            world.faulty_step()
        world.faulty = False
        for _ in range(MAX_TAIL_STEPS):
            if world.quiescent():
                break
            world.tail_step()
        _ensure(world.quiescent(), f"not quiescent after {MAX_TAIL_STEPS} fault-free steps")
        check_final(world)
    except (SimFailure, ProtocolViolation, KeyError) as exc:
        trace = "\n  ".join(world.trace)
        raise SimFailure(
            f"seed {seed} failed: {type(exc).__name__}: {exc}\n"
            f"replay: LEDGER_SIM_SEED={seed} pytest tests/sim -k replay\n"
            f"faults: {world.faults}\nlast steps:\n  {trace}"
        ) from exc
    world.stats["applied"] += sum(len(s.applied) for s in world.shards)
    return world.stats


def test_many_seeds() -> None:
    """The protocol keeps every check on `LEDGER_SIM_SEEDS` seeds (default 250) and exercises the faults."""
    totals: Counter[str] = Counter()
    for seed in range(int(os.environ.get("LEDGER_SIM_SEEDS", DEFAULT_SEEDS))):
        totals.update(run_seed(seed))
    exercised = ("decided-commit", "decided-abort", "presumed-aborts", "reloads", "timeouts", "vote-no")
    for what in (*exercised, "vote-no-reloaded", "commit-after-reloaded-no"):
        assert totals[what] > 0, f"simulation never exercised {what}: {totals}"
    for point in ("after-intent", "after-decision", "after-votes", "after-yes"):
        assert totals[f"crash-{point}"] > 0, f"no crash {point}: {totals}"


def test_replay_seed() -> None:
    """Replay the seed in LEDGER_SIM_SEED (seed 0 when unset, so the replay path is exercised)."""
    run_seed(int(os.environ.get("LEDGER_SIM_SEED", "0")))
