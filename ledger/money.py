"""Money: integer minor units plus an ISO 4217 currency code. Never a float.

The active currency list ships with the project (`ledger/data/iso4217.txt`).
"""

from __future__ import annotations

from importlib import resources
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

INT64_MAX: Final = 2**63 - 1


def _load_currencies() -> MappingProxyType[str, int]:
    text = resources.files("ledger").joinpath("data/iso4217.txt").read_text(encoding="ascii")
    table: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        code, minor = line.split()
        table[code] = int(minor)
    return MappingProxyType(table)


CURRENCY_MINOR_UNITS: Final = _load_currencies()

if TYPE_CHECKING:
    CurrencyCode = str
else:
    CurrencyCode = Literal[tuple(CURRENCY_MINOR_UNITS)]
"""A decode type: exactly the codes `is_currency` accepts, checked by msgspec while decoding."""


def is_currency(code: str) -> bool:
    """True if `code` is an active ISO 4217 code (upper case, three letters)."""
    return code in CURRENCY_MINOR_UNITS


def fits_int64(amount: int) -> bool:
    """True if `amount` fits a signed 64-bit integer column."""
    return -INT64_MAX - 1 <= amount <= INT64_MAX
