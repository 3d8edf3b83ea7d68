"""Accounts: typed ids (`type:rest`), their normal side, and the overdraft policy."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Final

import msgspec

ACCOUNT_ID_PATTERN: Final = re.compile(r"^(asset|liability|equity|revenue|expense):[A-Za-z0-9:._-]+$")
ACCOUNT_ID_LENGTH_MAX: Final = 200


class AccountType(enum.StrEnum):
    """The five account types; the prefix of every account id."""

    ASSET = "asset"
    LIABILITY = "liability"
    EQUITY = "equity"
    REVENUE = "revenue"
    EXPENSE = "expense"

    @property
    def debit_normal(self) -> bool:
        """Asset and expense balances grow with debits; the others grow with credits."""
        return self in (AccountType.ASSET, AccountType.EXPENSE)


class AccountPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-account policy.

    `no_negative`: the normal-side balance may not go below zero (the overdraft guard).
    `split`: a hot account booked by every shard (the shard of each journal's other lines), so it
    never funnels traffic through one shard; it cannot also be guarded (migration 0005).
    """

    no_negative: bool = False
    split: bool = False


_TYPE_CACHE_MAX: Final = 1 << 18
_type_cache: dict[str, AccountType] = {}
KNOWN_ACCOUNT_TYPES: Final[Mapping[str, AccountType]] = _type_cache
"""Ids `account_type_of` already accepted, with their type (read-only view of its cache).

A hit is a valid id; a miss means nothing (call `account_type_of`). Hot loops read it directly
to save a function call per line.
"""


def account_type_of(account_id: str) -> AccountType | None:
    """The type named by the id's prefix, or None when the id is malformed.

    Valid ids are remembered (a bounded cache, emptied when full): the front end parses the
    same hot account ids for every journal of every batch.
    """
    cached = _type_cache.get(account_id)
    if cached is not None:
        return cached
    if len(account_id) > ACCOUNT_ID_LENGTH_MAX or not ACCOUNT_ID_PATTERN.fullmatch(account_id):
        return None
    account_type = AccountType(account_id.split(":", 1)[0])
    if len(_type_cache) >= _TYPE_CACHE_MAX:
        _type_cache.clear()
    _type_cache[account_id] = account_type
    return account_type


def normal_balance(account_type: AccountType, debits: int, credits: int) -> int:
    """Balance on the account's normal side (debits - credits for asset/expense)."""
    return debits - credits if account_type.debit_normal else credits - debits
