"""Fuzzing the offline verifier: mutated packages never verify (unless the mutation changes nothing
that is claimed or authenticated) and the verifier never raises.

What counts as "no change" (the oracle, `_equivalent`): the mutated bytes decode as a package, and
after removing the fields a package carries only as unauthenticated metadata -- `proof_id`,
`generated_at`, the informational `signer.keys` list, and the `prev_hash` of a shard's first member
entry when that entry's predecessor is not in the package (nothing signed covers it) -- the canonical
bytes are identical to the original's; a changed `range` is acceptable only if it is still a true claim
(members inside it, boundary batches outside it, or exactly the listed log indexes).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.timestamps import parse_rfc3339
from signer.canonical import canonical
from signer.package import PackageError, decode_package
from signer.verify import VerifyReport, verify_package
from tests.support.proofs import make_ledger, package_bytes

_LEDGER = make_ledger(journals=18, shards=2, batch_size=3, seed=11)
ORIGINAL = package_bytes(_LEDGER.package_for_time_range(*_LEDGER.middle_time_range()))
PEMS = _LEDGER.public_pems()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REPLACEMENTS: list[Any] = [0, -1, 1, 2**70, 1.5, "", "x", None, True, False, [], {}, ["x"], {"x": 1}]


def _verify(data: bytes) -> VerifyReport:
    report = verify_package(data, PEMS)
    assert not any(c.name == "internal error" for c in report.checks), report.checks
    return report


def _authenticated_view(pkg: dict[str, Any]) -> bytes:
    """Canonical bytes of everything a signature, hash or proof covers (see the module docstring)."""
    view = json.loads(canonical(pkg))
    for key in ("proof_id", "generated_at", "range"):
        view.pop(key, None)
    view.get("signer", {}).pop("keys", None)
    seen: set[Any] = set()
    ordered = sorted(
        view.get("batches", []), key=lambda b: (b["statement"]["shard"], b["statement"]["batch_seq"])
    )
    for batch in ordered:
        if batch["role"] != "member" or not batch["entries"]:
            continue
        shard = batch["statement"]["shard"]
        first = batch["entries"][0]
        if shard not in seen and first["seq"] > 1 and first["prev_hash"] is not None:
            first["prev_hash"] = "unverifiable"
        seen.add(shard)
    return canonical(view)


def _range_holds(pkg: dict[str, Any]) -> bool:
    """Is the (possibly changed) range still a true description of the batches?"""
    rng, batches = pkg["range"], pkg["batches"]
    if "from_index" in rng:
        wanted = set(range(rng["from_index"], rng["to_index"] + 1))
        return wanted == {b["log_index"] for b in batches}
    start, end = parse_rfc3339(rng["from_ts"]), parse_rfc3339(rng["to_ts"])
    assert start is not None and end is not None
    for batch in batches:
        signed = parse_rfc3339(batch["statement"]["signed_at"])
        assert signed is not None
        where = {"member": start <= signed <= end, "before": signed < start, "after": signed > end}
        if not where[batch["role"]]:
            return False
    return True


def _equivalent(mutated: bytes) -> bool:
    """True when the mutation changed nothing claimed or authenticated (the only way to stay ok)."""
    try:
        decode_package(mutated)
    except PackageError:
        return False
    new, old = json.loads(mutated), json.loads(ORIGINAL)
    return _authenticated_view(new) == _authenticated_view(old) and _range_holds(new)


def _check(mutated: bytes) -> None:
    report = _verify(mutated)
    if report.ok:
        assert _equivalent(mutated), [c for c in report.checks if c.ok][:3]


def test_original_verifies() -> None:
    """The fuzzed package is valid to start with (so a failure below is the mutation's doing)."""
    assert _verify(ORIGINAL).ok


@FUZZ
@given(position=st.integers(0, len(ORIGINAL) - 1), xor=st.integers(1, 255))
def test_byte_flips_never_verify(position: int, xor: int) -> None:
    """Flipping any bits of any byte is caught (or decodes to the very same package)."""
    data = bytearray(ORIGINAL)
    data[position] ^= xor
    _check(bytes(data))


@FUZZ
@given(length=st.integers(0, len(ORIGINAL) - 1))
def test_truncations_never_verify(length: int) -> None:
    """Any proper prefix of the package is rejected."""
    assert not _verify(ORIGINAL[:length]).ok


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node of a JSON value (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


PATHS = _paths(json.loads(ORIGINAL))


def _mutate(doc: Any, path: tuple[Any, ...], op: str, replacement: Any) -> None:
    """Apply one structural mutation at `path`."""
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, current = path[-1], parent[path[-1]]
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = replacement
    elif op == "nudge" and isinstance(current, bool | None):
        parent[key] = not current
    elif op == "nudge" and isinstance(current, int):
        parent[key] = current + (1 if replacement else -1)
    elif op == "nudge" and isinstance(current, str):
        parent[key] = current[:-1] + ("0" if current[-1:] != "0" else "1") if current else "a"
    else:
        parent[key] = [current]


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    op=st.sampled_from(["delete", "replace", "nudge", "wrap"]),
    replacement=st.sampled_from(REPLACEMENTS),
)
def test_structural_mutations_never_verify(path: tuple[Any, ...], op: str, replacement: Any) -> None:
    """Deleted keys and list items, type changes, off-by-one values and edited strings are caught."""
    doc = json.loads(ORIGINAL)
    _mutate(doc, path, op, replacement)
    _check(canonical(doc))


@FUZZ
@given(
    first=st.sampled_from(PATHS),
    second=st.sampled_from(PATHS),
    replacement=st.sampled_from(REPLACEMENTS),
)
def test_double_mutations_never_verify(
    first: tuple[Any, ...], second: tuple[Any, ...], replacement: Any
) -> None:
    """Two mutations at once (e.g. an edited value and a matching edit elsewhere) are still caught."""
    doc = json.loads(ORIGINAL)
    _mutate(doc, first, "nudge", True)
    try:
        _mutate(doc, second, "replace", replacement)
    except (KeyError, IndexError, TypeError):
        return
    _check(canonical(doc))


def test_oracle_accepts_only_harmless_changes() -> None:
    """Sanity of the oracle: metadata edits are harmless, an authenticated edit is not."""
    doc = json.loads(ORIGINAL)
    doc["proof_id"] = "another-id"
    assert _equivalent(canonical(doc)) and _verify(canonical(doc)).ok
    doc["batches"][0]["log_index"] += 1
    assert not _equivalent(canonical(doc))
