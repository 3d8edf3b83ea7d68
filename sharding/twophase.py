"""Cross-shard two-phase commit (presumed abort) as pure state machines.

The coordinator and participant actors own all I/O (decision log, balances store, messaging); they feed
events into these classes and act on what the classes return.  Nothing here performs I/O, reads a clock
or draws random numbers.

Protocol summary (vocabulary *prepare / commit / abort* is reserved for it):

* The coordinator durably logs the intent (phase PREPARING with the whole journal), sends PREPARE to every
  participant, decides COMMIT iff every participant voted YES (any NO, failed call or timeout -> ABORT),
  makes a COMMIT durable (the commit point; in the node, the journal row), resends the decision until
  every participant acknowledged, then forgets the tx (DONE).  Only COMMIT needs a durable record: on
  restart a logged tx without one is aborted (presumed abort, `logged_decision`), one with it is resent.
* A participant reserves its part on a YES vote.  On restart it re-reserves, unconditionally, every logged
  unfinished tx naming it that it has not applied (`reservations_to_reload`).  Because it
  cannot know whether it voted YES before the crash, a reloaded reservation that is later refused keeps
  holding its funds until the decision arrives (see `ParticipantTx.on_prepare`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CoordinatorTx",
    "Decision",
    "PartVote",
    "ParticipantState",
    "ParticipantTx",
    "Phase",
    "ProtocolViolation",
    "logged_decision",
    "recovery_decision",
    "reservations_to_reload",
    "stale_reservations",
]


class ProtocolViolation(Exception):
    """An invariant of the two-phase-commit protocol was broken (always checked, also in production)."""


def _check(condition: bool, message: str, *args: object) -> None:
    """Raise `ProtocolViolation` with `message % args` unless `condition` holds.

    The message is formatted only on failure: these checks run several times per journal.
    """
    if not condition:
        raise ProtocolViolation(message % args if args else message)


class Phase(enum.StrEnum):
    """Coordinator phase of a cross-shard tx; values equal the SQL ``xtx.state`` values."""

    PREPARING = "preparing"
    COMMIT = "commit"
    ABORT = "abort"
    DONE = "done"


class Decision(enum.StrEnum):
    """Outcome of a cross-shard tx."""

    COMMIT = "commit"
    ABORT = "abort"


class PartVote(enum.StrEnum):
    """A participant's answer to PREPARE."""

    YES = "yes"
    NO = "no"


_PHASE_OF: dict[Decision, Phase] = {Decision.COMMIT: Phase.COMMIT, Decision.ABORT: Phase.ABORT}


def recovery_decision(phase: Phase) -> Decision | None:
    """Decision a restarted coordinator takes for a logged tx: PREPARING is presumed aborted; DONE: none."""
    if phase in (Phase.PREPARING, Phase.ABORT):
        return Decision.ABORT
    if phase == Phase.COMMIT:
        return Decision.COMMIT
    return None


def logged_decision(*, committed: bool) -> Decision:
    """Decision a restarted coordinator resends for a logged tx that no live round owns.

    The commit record is the tx's journal row, written by the decision in one statement
    (`committed`): a tx without it was never decided COMMIT, and with no live round left to
    decide it, it is presumed aborted. The log row itself only says "maybe prepared".
    """
    return Decision.COMMIT if committed else Decision.ABORT


@dataclass(slots=True)
class CoordinatorTx:
    """The coordinator's in-memory view of one cross-shard tx.

    `proposal` is the decision reached from the votes but not yet durable; `decision` is set by `decided`
    once the caller has logged it.  `phase` becomes DONE (in memory) when every participant acknowledged;
    the caller then logs DONE.
    """

    txid: str
    participants: frozenset[int]
    phase: Phase = Phase.PREPARING
    decision: Decision | None = None
    proposal: Decision | None = None
    votes: dict[int, bool] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        """Validate the participant set and the initial phase/decision pair."""
        if self.phase is Phase.PREPARING and self.decision is None and self.participants:
            return  # a new tx (the coordinator builds one per cross-shard journal): nothing else to check
        _check(len(self.participants) > 0, "tx %s: no participants", self.txid)
        if self.phase == Phase.PREPARING:
            _check(self.decision is None, "tx %s: PREPARING with a decision", self.txid)
        elif self.phase != Phase.DONE:
            _check(
                self.decision == recovery_decision(self.phase), "tx %s: phase/decision mismatch", self.txid
            )

    @classmethod
    def recovered(cls, txid: str, participants: frozenset[int], phase: Phase) -> CoordinatorTx:
        """Rebuild a tx from its logged phase after a coordinator restart (no votes, no acks survive).

        A PREPARING tx stays PREPARING: the caller logs ABORT (`recovery_decision`) then calls `decided`.
        """
        decision = recovery_decision(phase) if phase in (Phase.COMMIT, Phase.ABORT) else None
        return cls(txid, participants, phase, decision)

    def _check_participant(self, shard: int) -> None:
        """Fail unless `shard` takes part in this tx."""
        _check(shard in self.participants, "tx %s: shard %s is not a participant", self.txid, shard)

    def on_vote(self, shard: int, yes: bool) -> Decision | None:
        """Record a vote; return the decision the moment it is reached (ABORT at first NO, COMMIT on all YES).

        Returns None while waiting, for duplicate votes (the first vote of a shard counts) and for votes
        arriving after the decision was reached.
        """
        if shard not in self.participants:
            self._check_participant(shard)
        votes = self.votes
        # Identity checks: phases and decisions are always the enum members (typed; the log's states
        # are converted with `Phase(...)`), and `is` costs a fraction of a StrEnum `==`.
        if self.phase is not Phase.PREPARING or self.proposal is not None or shard in votes:
            return None
        votes[shard] = yes
        if not yes:
            self.proposal = Decision.ABORT
        elif len(votes) == len(self.participants) and all(votes.values()):
            self.proposal = Decision.COMMIT
        return self.proposal

    def on_failure(self, shard: int) -> Decision | None:
        """A failed or timed-out PREPARE call counts as a NO vote while PREPARING."""
        return self.on_vote(shard, False)

    def missing_votes(self) -> frozenset[int]:
        """Participants whose vote has not arrived yet."""
        return self.participants - self.votes.keys()

    def decided(self, decision: Decision) -> None:
        """Record that `decision` is durable.  COMMIT needs all YES; deciding differently twice fails."""
        if self.decision is not None:
            _check(self.decision == decision, "tx %s: decided %s, now %s", self.txid, self.decision, decision)
            return
        if self.phase is not Phase.PREPARING:
            _check(False, "tx %s: deciding in phase %s", self.txid, self.phase)
        if decision is Decision.COMMIT:
            if self.proposal is not Decision.COMMIT:
                _check(False, "tx %s: COMMIT without every vote YES", self.txid)
            self.phase = Phase.COMMIT
        else:
            self.phase = _PHASE_OF[decision]
        self.decision = decision

    def on_ack(self, shard: int) -> bool:
        """Record a participant's acknowledgement of the decision; True once all acked (phase DONE)."""
        if shard not in self.participants:
            self._check_participant(shard)
        if self.decision is None:
            _check(False, "tx %s: ack from shard %s before the decision", self.txid, shard)
        acked = self.acked
        acked.add(shard)
        if len(acked) == len(self.participants):  # acks come only from participants
            self.phase = Phase.DONE
        return self.phase is Phase.DONE

    def unacked(self) -> frozenset[int]:
        """Participants that have not acknowledged the decision yet."""
        return self.participants - self.acked


ParticipantState = Literal["new", "reserved", "refused", "committed", "aborted"]


@dataclass(slots=True)
class ParticipantTx:
    """One participant's in-memory view of one tx.

    `holds_reservation` says whether the part's amounts must currently be reserved; the caller keeps its
    reservation table in sync with it after every event.  `reloaded` marks a reservation re-created on
    restart whose pre-crash vote is unknown (`vote` is None until a PREPARE arrives again).

    Build with `ParticipantTx(txid)` on a first PREPARE, `reload(txid)` on restart, `applied(txid)` when the
    durable store already holds the part, `tombstone(txid)` for an ABORT of an unknown tx.
    """

    txid: str
    state: ParticipantState = "new"
    vote: PartVote | None = None
    holds_reservation: bool = False
    reloaded: bool = False

    @classmethod
    def reload(cls, txid: str) -> ParticipantTx:
        """A reservation re-created, unconditionally, when the participant restarts."""
        return cls(txid, "reserved", None, holds_reservation=True, reloaded=True)

    @classmethod
    def applied(cls, txid: str) -> ParticipantTx:
        """A tx whose part the durable store already applied (e.g. seen again after a restart)."""
        return cls(txid, "committed", PartVote.YES)

    @classmethod
    def tombstone(cls, txid: str) -> ParticipantTx:
        """An ABORT arrived for a tx never seen: remember it so a late PREPARE is refused."""
        return cls(txid, "aborted")

    def on_prepare(self, fits: bool) -> PartVote:
        """Vote on PREPARE; `fits`: the part passes the overdraft guard, this tx's own reservation excluded.

        Idempotent: once a vote is cast, repeated PREPAREs get the same vote and `fits` is ignored.  A
        committed tx answers YES, an aborted one NO.  A reloaded reservation votes on `fits`; when refused
        it keeps holding its funds until the decision, because a YES may have been sent before the crash
        and the coordinator may already have committed on it.
        """
        if self.vote is not None:
            return self.vote
        if self.state == "committed":
            self.vote = PartVote.YES
        elif self.state == "aborted":
            self.vote = PartVote.NO
        elif fits:
            self.state, self.vote, self.holds_reservation = "reserved", PartVote.YES, True
        else:
            self.state, self.vote = "refused", PartVote.NO
        return self.vote

    def on_commit(self) -> bool:
        """Handle COMMIT: True if the part must be applied now (and the reservation released), False if done.

        Committing a tx this participant refused (without a possibly-YES history) or aborted, or never
        prepared, is a protocol violation.
        """
        if self.state == "committed":
            return False
        may_commit = self.state == "reserved" or (self.state == "refused" and self.reloaded)
        _check(may_commit, "tx %s: COMMIT for a participant in state %s", self.txid, self.state)
        self.state, self.holds_reservation = "committed", False
        return True

    def on_abort(self) -> bool:
        """Handle ABORT (idempotent): True if a reservation must be released now."""
        _check(self.state != "committed", "tx %s: ABORT for a committed participant", self.txid)
        release = self.holds_reservation
        self.state, self.holds_reservation = "aborted", False
        return release


LogRow = tuple[str, Phase, frozenset[int], frozenset[int]]


def reservations_to_reload(shard: int, log: Iterable[LogRow]) -> list[str]:
    """Txids a restarted `shard` must re-reserve, in log order.

    Those are the txs naming it that are PREPARING or COMMIT and that it has not applied.  Log rows
    are (txid, phase, participants, shards_that_applied).  A logged row stays PREPARING until the tx
    is finished (its commit record is the journal row), so a PREPARING row may be committed and
    applied by some participants already: those must not reserve it again.
    """
    return [
        txid
        for txid, phase, participants, applied in log
        if shard in participants and shard not in applied and phase in (Phase.PREPARING, Phase.COMMIT)
    ]


def stale_reservations(held: Iterable[str], phase_of: Mapping[str, Phase]) -> list[str]:
    """Held reservations whose tx is finished in the log (ABORT, DONE or no longer logged).

    A duplicated PREPARE delivered after the tx finished, to a participant that restarted meanwhile,
    reserves funds nobody will release; a periodic sweep releases them with `ParticipantTx.on_abort`.
    """
    return [txid for txid in held if phase_of.get(txid, Phase.DONE) in (Phase.ABORT, Phase.DONE)]
