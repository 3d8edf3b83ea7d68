"""Tax decisions: VAT / GST / sales tax per line, from the rules table and the buyer's location.

The table (`finance/tax_rules.json`, package data) maps a jurisdiction (`DE`, `GB`, `US-WA`) and a
tax code (`standard`, `reduced`, `zero`, `exempt`, `digital_services`, `ebook`, ...) to a rate in
percent; it is parsed once into basis points. `TaxRules.decide` picks the jurisdiction and the rate
for one line and returns a `TaxDecision` carrying the `TaxEvidence` an auditor needs:

1. EU B2B reverse charge: the buyer is in an EU member state other than the seller's and gives a
   VAT id whose format is valid for that country -> rate 0, `reverse_charge=True`, and the invoice
   carries `REVERSE_CHARGE_WORDING`. The buyer accounts for the VAT (Directive 2006/112/EC art. 196).
   (The format check is not a VIES lookup: that is I/O, done at the edge and recorded separately.)
2. Otherwise the place of supply is the buyer's location: the buyer country's rates (domestic when
   it is the seller's country, OSS when both are in the EU, the local scheme otherwise), or, for the
   US, the buyer's state (`region` required).

Unknown jurisdictions and tax codes, malformed country codes and malformed VAT ids are
VALIDATION_ERROR rejections naming the request field, so the API answers 400.
"""

from __future__ import annotations

import re
from importlib import resources
from types import MappingProxyType
from typing import Final, Literal

import msgspec

from finance.money import format_rate_percent, parse_rate_percent
from ledger.errors import validation_error

Scheme = Literal["domestic", "oss", "local", "reverse_charge"]

COUNTRY_PATTERN: Final = re.compile(r"^[A-Z]{2}$")
REGION_PATTERN: Final = re.compile(r"^[A-Z0-9]{1,3}$")

VAT_ID_PATTERNS: Final[MappingProxyType[str, re.Pattern[str]]] = MappingProxyType(
    {
        "DE": re.compile(r"^DE[0-9]{9}$"),
        "FR": re.compile(r"^FR[0-9A-HJ-NP-Z]{2}[0-9]{9}$"),
        "NL": re.compile(r"^NL[0-9]{9}B[0-9]{2}$"),
        "IE": re.compile(r"^IE([0-9]{7}[A-W][A-IW]?|[0-9][A-Z+*][0-9]{5}[A-W])$"),
        "ES": re.compile(r"^ES([A-Z][0-9]{7}[A-Z0-9]|[0-9]{8}[A-Z])$"),
        "AT": re.compile(r"^ATU[0-9]{8}$"),
        "BE": re.compile(r"^BE[01][0-9]{9}$"),
        "IT": re.compile(r"^IT[0-9]{11}$"),
        "PL": re.compile(r"^PL[0-9]{10}$"),
        "SE": re.compile(r"^SE[0-9]{10}01$"),
    }
)
"""Country-specific VAT id formats (after normalisation: upper case, no spaces, dots or dashes)."""

GENERIC_EU_VAT_ID: Final = re.compile(r"^[A-Z]{2}[0-9A-Z+*]{2,12}$")
"""Fallback for EU member states without a specific pattern: prefix plus 2-12 characters."""

VAT_ID_PREFIX_OVERRIDES: Final = MappingProxyType({"GR": "EL"})
"""Greece uses `EL` as its VAT prefix, not its ISO code."""


class Seller(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the seller (the platform) is established for VAT; configurable per deployment."""

    country: str = "IE"
    vat_id: str | None = None


class BuyerLocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the buyer told us (and what we observed) about where they are."""

    country: str
    region: str | None = None
    address: str | None = None
    vat_id: str | None = None
    ip_country: str | None = None


class TaxEvidence(msgspec.Struct, frozen=True):
    """The facts a tax decision rests on, stored with the invoice line for audit (F9)."""

    buyer_country: str
    buyer_region: str | None
    buyer_address: str | None
    buyer_vat_id: str | None
    ip_country: str | None
    locations_agree: bool
    seller_country: str
    jurisdiction: str
    tax_code: str
    scheme: Scheme
    rule_id: str
    rate: str
    rate_bp: int
    reverse_charge: bool


class TaxDecision(msgspec.Struct, frozen=True):
    """The rate for one line and why."""

    jurisdiction: str
    tax_code: str
    rate_bp: int
    reverse_charge: bool
    rule_id: str
    evidence: TaxEvidence


class _JurisdictionFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tax_name: str
    eu: bool
    rates: dict[str, str]


class _RulesFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str
    note: str
    reverse_charge_wording: str
    eu_members: list[str]
    jurisdictions: dict[str, _JurisdictionFile]


def normalise_vat_id(vat_id: str) -> str:
    """Upper case without spaces, dots and dashes (`de 123.456.789` -> `DE123456789`)."""
    return re.sub(r"[\s.\-]", "", vat_id).upper()


class TaxRules:
    """The parsed rules table; build with `load_rules()` (or from a dict for tests)."""

    def __init__(self, raw: _RulesFile) -> None:
        self.version = raw.version
        self.reverse_charge_wording = raw.reverse_charge_wording
        self.eu_members: frozenset[str] = frozenset(raw.eu_members)
        self.tax_names = {code: j.tax_name for code, j in raw.jurisdictions.items()}
        self.rates_bp: dict[str, dict[str, int]] = {
            code: {tax_code: parse_rate_percent(rate) for tax_code, rate in j.rates.items()}
            for code, j in raw.jurisdictions.items()
        }
        self.tax_codes: frozenset[str] = frozenset(c for rates in self.rates_bp.values() for c in rates)

    @classmethod
    def from_json(cls, data: bytes | str) -> TaxRules:
        """Parse a rules document (the shape of `finance/tax_rules.json`)."""
        return cls(msgspec.json.decode(data, type=_RulesFile))

    def vat_id_valid(self, country: str, vat_id: str) -> bool:
        """True if `vat_id` (normalised) has a valid format for an EU buyer in `country`."""
        normal = normalise_vat_id(vat_id)
        prefix = VAT_ID_PREFIX_OVERRIDES.get(country, country)
        if country not in self.eu_members or not normal.startswith(prefix):
            return False
        pattern = VAT_ID_PATTERNS.get(country, GENERIC_EU_VAT_ID)
        return bool(pattern.fullmatch(normal))

    def jurisdiction_of(self, buyer: BuyerLocation, field: str = "$.buyer") -> str:
        """The taxing jurisdiction for a buyer location (the country, or `US-{state}`)."""
        if not COUNTRY_PATTERN.fullmatch(buyer.country):
            raise validation_error("country must be an ISO 3166-1 alpha-2 code", f"{field}.country")
        if buyer.country == "US":
            if buyer.region is None or not REGION_PATTERN.fullmatch(buyer.region):
                raise validation_error("US buyers need a state code in region", f"{field}.region")
            return f"US-{buyer.region}"
        return buyer.country

    def decide(
        self, buyer: BuyerLocation, tax_code: str, seller: Seller, *, field: str, buyer_field: str = "$.buyer"
    ) -> TaxDecision:
        """The tax decision for one line with `tax_code` sold by `seller` to `buyer`.

        `field` names the line's tax_code in the request (for errors); `buyer_field` the buyer.
        """
        jurisdiction = self.jurisdiction_of(buyer, buyer_field)
        if tax_code not in self.tax_codes:
            raise validation_error(f"unknown tax_code {tax_code!r}", field, tax_code=tax_code)
        vat_id = None if buyer.vat_id is None else normalise_vat_id(buyer.vat_id)
        if (
            vat_id is not None
            and buyer.country in self.eu_members
            and not self.vat_id_valid(buyer.country, vat_id)
        ):
            raise validation_error(
                f"vat_id {buyer.vat_id!r} is not a valid {buyer.country} VAT id format",
                f"{buyer_field}.vat_id",
            )
        if self._reverse_charge(buyer, vat_id, seller, tax_code):
            return self._decision(buyer, vat_id, seller, jurisdiction, tax_code, "reverse_charge", 0)
        rates = self.rates_bp.get(jurisdiction)
        if rates is None:
            raise validation_error(
                f"no tax rules for jurisdiction {jurisdiction}",
                f"{buyer_field}.country",
                jurisdiction=jurisdiction,
            )
        rate_bp = rates.get(tax_code)
        if rate_bp is None:
            raise validation_error(
                f"tax_code {tax_code!r} is not defined for {jurisdiction}", field, jurisdiction=jurisdiction
            )
        scheme: Scheme = "local"
        if buyer.country == seller.country:
            scheme = "domestic"
        elif buyer.country in self.eu_members and seller.country in self.eu_members:
            scheme = "oss"
        return self._decision(buyer, vat_id, seller, jurisdiction, tax_code, scheme, rate_bp)

    def _reverse_charge(
        self, buyer: BuyerLocation, vat_id: str | None, seller: Seller, tax_code: str
    ) -> bool:
        return (
            vat_id is not None
            and tax_code != "exempt"
            and buyer.country in self.eu_members
            and buyer.country != seller.country
        )

    def _decision(
        self,
        buyer: BuyerLocation,
        vat_id: str | None,
        seller: Seller,
        jurisdiction: str,
        tax_code: str,
        scheme: Scheme,
        rate_bp: int,
    ) -> TaxDecision:
        reverse = scheme == "reverse_charge"
        rule_id = f"EU:reverse_charge:{jurisdiction}" if reverse else f"{jurisdiction}:{tax_code}:{scheme}"
        evidence = TaxEvidence(
            buyer_country=buyer.country,
            buyer_region=buyer.region,
            buyer_address=buyer.address,
            buyer_vat_id=vat_id,
            ip_country=buyer.ip_country,
            locations_agree=buyer.ip_country is None or buyer.ip_country == buyer.country,
            seller_country=seller.country,
            jurisdiction=jurisdiction,
            tax_code=tax_code,
            scheme=scheme,
            rule_id=rule_id,
            rate=format_rate_percent(rate_bp),
            rate_bp=rate_bp,
            reverse_charge=reverse,
        )
        return TaxDecision(jurisdiction, tax_code, rate_bp, reverse, rule_id, evidence)


_DEFAULT_RULES: TaxRules | None = None


def load_rules() -> TaxRules:
    """The rules shipped with the package (parsed once)."""
    global _DEFAULT_RULES  # noqa: PLW0603 - a parse-once cache of immutable package data
    if _DEFAULT_RULES is None:
        text = resources.files("finance").joinpath("tax_rules.json").read_bytes()
        _DEFAULT_RULES = TaxRules.from_json(text)
    return _DEFAULT_RULES
