"""Unit tests of the two-phase-commit state machines in `sharding.twophase`."""

from __future__ import annotations

import pytest

from sharding.twophase import (
    CoordinatorTx,
    Decision,
    ParticipantTx,
    PartVote,
    Phase,
    ProtocolViolation,
    logged_decision,
    recovery_decision,
    reservations_to_reload,
    stale_reservations,
)


def _tx(*shards: int) -> CoordinatorTx:
    """Build a fresh coordinator tx over `shards`."""
    return CoordinatorTx("t1", frozenset(shards))


def test_phase_values_match_sql_states() -> None:
    """The enum values are the SQL xtx.state values."""
    assert [p.value for p in Phase] == ["preparing", "commit", "abort", "done"]
    assert Phase("commit") == Decision.COMMIT.value


def test_commit_when_all_yes_and_duplicates_ignored() -> None:
    """COMMIT is returned once, when the last YES arrives; duplicates and late votes are ignored."""
    tx = _tx(1, 2)
    assert tx.on_vote(1, True) is None
    assert tx.on_vote(1, True) is None
    assert tx.on_vote(2, True) is Decision.COMMIT
    assert tx.on_vote(2, False) is None
    assert tx.decision is None
    tx.decided(Decision.COMMIT)
    assert tx.phase == Phase.COMMIT


def test_first_no_aborts_and_first_vote_of_a_shard_wins() -> None:
    """ABORT at the first NO; a shard's later contradicting vote is a duplicate."""
    tx = _tx(1, 2, 3)
    assert tx.on_vote(1, True) is None
    assert tx.on_vote(1, False) is None
    assert tx.on_vote(2, False) is Decision.ABORT
    assert tx.on_vote(3, True) is None
    assert tx.proposal is Decision.ABORT


def test_failure_is_a_no_vote() -> None:
    """A failed or timed-out PREPARE call aborts the tx."""
    tx = _tx(1, 2)
    tx.on_vote(1, True)
    assert tx.on_failure(2) is Decision.ABORT
    with pytest.raises(ProtocolViolation):
        tx.decided(Decision.COMMIT)


def test_non_participant_vote_is_a_violation() -> None:
    """Votes and acks from a shard outside the tx are protocol violations."""
    tx = _tx(1, 2)
    with pytest.raises(ProtocolViolation):
        tx.on_vote(7, True)
    tx.decided(Decision.ABORT)
    with pytest.raises(ProtocolViolation):
        tx.on_ack(7)


def test_commit_needs_all_yes_and_decision_is_final() -> None:
    """COMMIT cannot be recorded without every YES; a different second decision is a violation."""
    tx = _tx(1, 2)
    tx.on_vote(1, True)
    with pytest.raises(ProtocolViolation):
        tx.decided(Decision.COMMIT)
    tx.decided(Decision.ABORT)
    tx.decided(Decision.ABORT)
    with pytest.raises(ProtocolViolation):
        tx.decided(Decision.COMMIT)


def test_acks_lead_to_done() -> None:
    """Acks only after the decision; DONE once every participant acked, duplicates harmless."""
    tx = _tx(1, 2)
    with pytest.raises(ProtocolViolation):
        tx.on_ack(1)
    tx.decided(Decision.ABORT)
    assert tx.on_ack(1) is False
    assert tx.on_ack(1) is False
    assert tx.unacked() == frozenset({2})
    assert tx.on_ack(2) is True
    assert tx.phase == Phase.DONE
    assert tx.unacked() == frozenset()


def test_logged_decision() -> None:
    """A logged tx with its commit record (the journal row) commits; without one it is presumed aborted."""
    assert logged_decision(committed=True) is Decision.COMMIT
    assert logged_decision(committed=False) is Decision.ABORT
    tx = CoordinatorTx.recovered("t1", frozenset({1, 2}), Phase(logged_decision(committed=True).value))
    assert (tx.phase, tx.decision) == (Phase.COMMIT, Decision.COMMIT)


def test_recovery() -> None:
    """Presumed abort for PREPARING; decided txs resend their decision; DONE needs nothing."""
    assert recovery_decision(Phase.PREPARING) is Decision.ABORT
    assert recovery_decision(Phase.COMMIT) is Decision.COMMIT
    assert recovery_decision(Phase.ABORT) is Decision.ABORT
    assert recovery_decision(Phase.DONE) is None
    tx = CoordinatorTx.recovered("t1", frozenset({1, 2}), Phase.PREPARING)
    tx.decided(Decision.ABORT)
    assert tx.phase == Phase.ABORT
    committed = CoordinatorTx.recovered("t2", frozenset({1, 2}), Phase.COMMIT)
    assert committed.decision is Decision.COMMIT
    assert committed.on_ack(1) is False


def test_participant_prepare_is_idempotent() -> None:
    """The first vote sticks, whatever `fits` says later."""
    yes = ParticipantTx("t1")
    assert yes.on_prepare(True) is PartVote.YES
    assert yes.holds_reservation
    assert yes.on_prepare(False) is PartVote.YES
    no = ParticipantTx("t2")
    assert no.on_prepare(False) is PartVote.NO
    assert not no.holds_reservation
    assert no.on_prepare(True) is PartVote.NO


def test_participant_commit_once() -> None:
    """COMMIT applies once; committing a refused tx is a violation; ABORT after commit too."""
    tx = ParticipantTx("t1")
    tx.on_prepare(True)
    assert tx.on_commit() is True
    assert not tx.holds_reservation
    assert tx.on_commit() is False
    assert tx.on_prepare(False) is PartVote.YES
    with pytest.raises(ProtocolViolation):
        tx.on_abort()
    refused = ParticipantTx("t2")
    refused.on_prepare(False)
    with pytest.raises(ProtocolViolation):
        refused.on_commit()
    with pytest.raises(ProtocolViolation):
        ParticipantTx("t3").on_commit()


def test_participant_abort() -> None:
    """ABORT releases a reservation once; an unknown tx gets a tombstone that refuses a late PREPARE."""
    tx = ParticipantTx("t1")
    tx.on_prepare(True)
    assert tx.on_abort() is True
    assert tx.on_abort() is False
    tomb = ParticipantTx.tombstone("t2")
    assert tomb.on_abort() is False
    assert tomb.on_prepare(True) is PartVote.NO
    assert not tomb.holds_reservation
    with pytest.raises(ProtocolViolation):
        tomb.on_commit()


def test_reloaded_reservation() -> None:
    """A reloaded reservation votes on `fits`; when refused it keeps its funds and may still commit."""
    fits = ParticipantTx.reload("t1")
    assert fits.holds_reservation and fits.vote is None
    assert fits.on_prepare(True) is PartVote.YES
    refused = ParticipantTx.reload("t2")
    assert refused.on_prepare(False) is PartVote.NO
    assert refused.holds_reservation
    assert refused.on_commit() is True
    released = ParticipantTx.reload("t3")
    released.on_prepare(False)
    assert released.on_abort() is True
    committed = ParticipantTx.reload("t4")
    assert committed.on_commit() is True
    assert committed.on_prepare(True) is PartVote.YES
    assert not committed.holds_reservation


def test_applied_tx_votes_yes_without_reserving() -> None:
    """A stale PREPARE for a part already in the store reserves nothing."""
    tx = ParticipantTx.applied("t1")
    assert tx.on_prepare(True) is PartVote.YES
    assert not tx.holds_reservation
    assert tx.on_commit() is False


def test_reservations_to_reload() -> None:
    """PREPARING or COMMIT, naming the shard and not applied by it; log order kept.

    Since migration 0023 a logged tx stays PREPARING until it is finished, committed or not: a
    participant that applied its part before a restart must not reserve it again (h)."""
    log = [
        ("a", Phase.PREPARING, frozenset({1, 2}), frozenset[int]()),
        ("h", Phase.PREPARING, frozenset({1, 2}), frozenset({1})),
        ("b", Phase.COMMIT, frozenset({1, 2}), frozenset({1})),
        ("c", Phase.COMMIT, frozenset({1, 2}), frozenset({2})),
        ("d", Phase.ABORT, frozenset({1, 2}), frozenset[int]()),
        ("e", Phase.DONE, frozenset({1, 2}), frozenset({1, 2})),
        ("f", Phase.PREPARING, frozenset({2, 3}), frozenset[int]()),
        ("g", Phase.PREPARING, frozenset({1, 3}), frozenset[int]()),
    ]
    assert reservations_to_reload(1, log) == ["a", "c", "g"]
    assert reservations_to_reload(2, log) == ["a", "h", "b", "f"]


def test_stale_reservations() -> None:
    """Reservations of ABORT, DONE or unlogged txs are stale; PREPARING and COMMIT are not."""
    phases = {"a": Phase.PREPARING, "b": Phase.COMMIT, "c": Phase.ABORT, "d": Phase.DONE}
    assert stale_reservations(["a", "b", "c", "d", "e"], phases) == ["c", "d", "e"]
