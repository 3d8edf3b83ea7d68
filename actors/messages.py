"""Messages between the front end and the actors (encoded with msgspec msgpack).

Every Ray call carries one batch: a list of items in, a list of results out, in order.
Items and results are `gc=False` structs (like `Journal` and `Line`): plain data, never part of
a reference cycle, so the thousands per call stay out of the cyclic collector's way.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ledger.journal import Journal, Line


class PostItem(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A single-shard journal to post (the id is always set by the front end)."""

    journal: Journal
    journal_id: str
    principal: str
    idem_key: str | None
    request_hash: bytes


class CrossItem(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A journal touching several shards: its lines split per participant shard."""

    journal: Journal
    journal_id: str
    principal: str
    idem_key: str | None
    request_hash: bytes
    parts: dict[int, tuple[Line, ...]]


class CrossCall(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A `CrossItem` as the coordinator decodes it: each part's lines kept as their msgpack bytes.

    Same wire format as `CrossItem`. The coordinator never reads a part's lines: it forwards them to
    the participant in a `PrepareOut` as they came, without decoding and encoding them again.
    """

    journal: Journal
    journal_id: str
    principal: str
    idem_key: str | None
    request_hash: bytes
    parts: dict[int, msgspec.Raw]


class PrepareItem(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One participant's part of a cross-shard journal, sent with PREPARE."""

    txid: str
    lines: tuple[Line, ...]


class PrepareOut(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A `PrepareItem` as the coordinator encodes it (`lines`: the part's msgpack bytes, as received)."""

    txid: str
    lines: msgspec.Raw


class DecideItem(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The coordinator's durable decision for one participant's part.

    No lines: a COMMIT applies the lines the participant reserved at PREPARE (a reservation lives
    until its decision, and a restarted participant reloads it from the `xtx` log). `hash` and
    `posted_at` are the committed journal's (empty for an ABORT).
    """

    txid: str
    commit: bool
    hash: bytes
    posted_at: str


class HoldItem(msgspec.Struct, frozen=True, array_like=True):
    """A hold call for the owning shard: create (with the journal held), post (with the lines to
    post, each at most its held line) or void. `request_hash` identifies the call for replays."""

    kind: str  # "create" | "post" | "void"
    hold_id: str
    principal: str
    idem_key: str | None
    request_hash: bytes
    journal: Journal | None = None
    lines: tuple[Line, ...] = ()
    expires_at: str | None = None


class Result(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """Outcome of one journal: ok with posted_at, or an error code with message and details."""

    journal_id: str
    ok: bool
    posted_at: str | None = None
    code: str | None = None
    message: str | None = None
    details: dict[str, Any] | None = None
    hash: bytes | None = None  # the journal hash of an ok result (for audit events)


ENCODER: Final = msgspec.msgpack.Encoder()
POST_ITEMS: Final = msgspec.msgpack.Decoder(list[PostItem])
CROSS_ITEMS: Final = msgspec.msgpack.Decoder(list[CrossItem])
PREPARE_ITEMS: Final = msgspec.msgpack.Decoder(list[PrepareItem])
DECIDE_ITEMS: Final = msgspec.msgpack.Decoder(list[DecideItem])
HOLD_ITEMS: Final = msgspec.msgpack.Decoder(list[HoldItem])
JOURNAL: Final = msgspec.msgpack.Decoder(Journal)
RESULTS: Final = msgspec.msgpack.Decoder(list[Result])
ACKS: Final = msgspec.msgpack.Decoder(list[bool])
# A shard's answer to PREPARE, one vote per part in order: `True` (YES), or the refusal (a NO).
Vote = bool | Result
VOTES: Final = msgspec.msgpack.Decoder(list[Vote])
# A coordinator call item by item: each item's msgpack bytes (kept for the `xtx` log), then decoded.
RAW_ITEMS: Final = msgspec.msgpack.Decoder(list[msgspec.Raw])
CROSS_ITEM: Final = msgspec.msgpack.Decoder(CrossItem)
CROSS_CALLS: Final = msgspec.msgpack.Decoder(list[CrossCall])
MSGPACK_ONE_ITEM_ARRAY: Final = b"\x91"  # msgpack fixarray header of a one-element array
