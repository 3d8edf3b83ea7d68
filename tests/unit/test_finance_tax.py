"""Unit tests of tax decisions (`finance.tax`) and the exact money helpers (`finance.money`)."""

from __future__ import annotations

import pytest

from finance.money import (
    allocate_proportional,
    apply_rate_bp,
    divide_half_even,
    format_rate_percent,
    parse_rate_percent,
)
from finance.tax import BuyerLocation, Seller, TaxRules, load_rules
from ledger.errors import ErrorCode, Rejection

RULES = load_rules()
IE = Seller(country="IE")


def _decide(
    country: str, tax_code: str = "standard", seller: Seller = IE, **buyer: str
) -> tuple[int, bool, str]:
    decision = RULES.decide(
        BuyerLocation(country, **buyer), tax_code, seller, field="$.line_items[0].tax_code"
    )
    return decision.rate_bp, decision.reverse_charge, decision.rule_id


@pytest.mark.parametrize(
    ("country", "tax_code", "rate_bp"),
    [
        ("DE", "standard", 1900),
        ("DE", "reduced", 700),
        ("FR", "standard", 2000),
        ("FR", "reduced", 1000),
        ("FR", "reduced_2", 550),
        ("NL", "standard", 2100),
        ("NL", "reduced", 900),
        ("IE", "standard", 2300),
        ("IE", "reduced", 1350),
        ("ES", "standard", 2100),
        ("ES", "reduced", 1000),
        ("ES", "super_reduced", 400),
        ("GB", "standard", 2000),
        ("GB", "reduced", 500),
        ("GB", "zero", 0),
        ("AU", "standard", 1000),
        ("NZ", "standard", 1500),
    ],
)
def test_b2c_rates_per_jurisdiction(country: str, tax_code: str, rate_bp: int) -> None:
    assert _decide(country, tax_code)[:2] == (rate_bp, False)


def test_domestic_oss_and_local_schemes() -> None:
    assert _decide("IE")[2] == "IE:standard:domestic"
    assert _decide("FR")[2] == "FR:standard:oss"  # B2C cross-border in the EU: buyer's rate
    assert _decide("AU")[2] == "AU:standard:local"


def test_reverse_charge_ie_seller_fr_business_buyer() -> None:
    rate_bp, reverse, rule_id = _decide("FR", vat_id="FR40303265045")
    assert (rate_bp, reverse, rule_id) == (0, True, "EU:reverse_charge:FR")


def test_reverse_charge_de_seller_fr_buyer_and_evidence() -> None:
    loc = BuyerLocation("FR", address="1 rue X, Paris", vat_id="fr 40 303.265.045", ip_country="DE")
    decision = RULES.decide(loc, "digital_services", Seller("DE"), field="f")
    ev = decision.evidence
    assert decision.reverse_charge and decision.rate_bp == 0
    assert ev.buyer_vat_id == "FR40303265045" and ev.seller_country == "DE" and ev.scheme == "reverse_charge"
    assert ev.ip_country == "DE" and ev.locations_agree is False and ev.buyer_address == "1 rue X, Paris"
    assert ev.rate == "0" and ev.rule_id == decision.rule_id


def test_same_country_b2b_is_charged() -> None:
    assert _decide("IE", vat_id="IE6388047V")[:2] == (2300, False)


def test_reverse_charge_reaches_eu_countries_without_rate_table() -> None:
    assert _decide("AT", vat_id="ATU12345678")[:2] == (0, True)
    assert _decide("GR", vat_id="EL123456789")[:2] == (0, True)


def test_b2c_outside_rate_table_is_a_validation_error() -> None:
    with pytest.raises(Rejection) as info:
        _decide("AT")
    assert info.value.code is ErrorCode.VALIDATION_ERROR and info.value.details["field"] == "$.buyer.country"
    with pytest.raises(Rejection):
        _decide("JP")


def test_us_state_sales_tax_needs_a_region() -> None:
    assert _decide("US", region="WA")[:2] == (650, False)
    with pytest.raises(Rejection) as info:
        _decide("US")
    assert info.value.details["field"] == "$.buyer.region"
    with pytest.raises(Rejection) as info:
        _decide("US", region="ZZ")
    assert info.value.details["field"] == "$.buyer.country"


def test_unknown_tax_code_names_the_field() -> None:
    with pytest.raises(Rejection) as info:
        _decide("DE", "luxury")
    assert info.value.details["field"] == "$.line_items[0].tax_code"
    with pytest.raises(Rejection) as info:  # known elsewhere, not defined for this jurisdiction
        _decide("US", "zero", region="WA")
    assert info.value.details["field"] == "$.line_items[0].tax_code"


def test_bad_country_code() -> None:
    with pytest.raises(Rejection) as info:
        _decide("france")
    assert info.value.details["field"] == "$.buyer.country"


@pytest.mark.parametrize(
    ("country", "vat_id"),
    [
        ("DE", "DE123456789"),
        ("FR", "FRXX123456789"),
        ("FR", "FR40303265045"),
        ("NL", "NL123456789B01"),
        ("IE", "IE6388047V"),
        ("IE", "IE1234567WA"),
        ("IE", "IE8Z49289F"),
        ("ES", "ESX1234567X"),
        ("ES", "ES12345678Z"),
        ("AT", "ATU12345678"),
        ("PT", "PT123456789"),
        ("GR", "EL123456789"),
        ("DE", "de 123-456-789"),
    ],
)
def test_vat_id_formats_accepted(country: str, vat_id: str) -> None:
    assert RULES.vat_id_valid(country, vat_id)


@pytest.mark.parametrize(
    ("country", "vat_id"),
    [
        ("DE", "DE12345678"),
        ("DE", "DE1234567890"),
        ("DE", "FR123456789"),
        ("FR", "FRIO123456789"),
        ("NL", "NL123456789A01"),
        ("IE", "IE1234567"),
        ("ES", "ES123456789"),
        ("AT", "AT12345678"),
        ("GR", "GR123456789"),
        ("GB", "GB123456789"),
        ("PT", "PT1"),
    ],
)
def test_vat_id_formats_rejected(country: str, vat_id: str) -> None:
    assert not RULES.vat_id_valid(country, vat_id)


def test_malformed_vat_id_of_an_eu_buyer_is_a_validation_error() -> None:
    with pytest.raises(Rejection) as info:
        _decide("FR", vat_id="FR123")
    assert info.value.details["field"] == "$.buyer.vat_id"


def test_rules_file_rejects_float_like_or_too_fine_rates() -> None:
    doc = '{"version":"t","note":"","reverse_charge_wording":"rc","eu_members":[],"jurisdictions":{"X":'
    with pytest.raises(ValueError):
        TaxRules.from_json(doc + '{"tax_name":"VAT","eu":false,"rates":{"standard":"19.125"}}}}')
    with pytest.raises(ValueError):
        TaxRules.from_json(doc + '{"tax_name":"VAT","eu":false,"rates":{"standard":"1e1"}}}}')
    assert (
        TaxRules.from_json(doc + '{"tax_name":"VAT","eu":false,"rates":{"s":"6.25"}}}}').rates_bp["X"]["s"]
        == 625
    )


def test_half_even_rounding() -> None:
    assert [divide_half_even(n, 2) for n in (1, 3, 5, -1, -3)] == [0, 2, 2, 0, -2]
    assert apply_rate_bp(250, 1000) == 25
    assert apply_rate_bp(25, 1000) == 2  # 2.5 -> 2
    assert apply_rate_bp(35, 1000) == 4  # 3.5 -> 4
    assert apply_rate_bp(999, 550) == 55  # 54.945
    assert parse_rate_percent("5.5") == 550 and format_rate_percent(550) == "5.5"
    assert format_rate_percent(1350) == "13.5" and format_rate_percent(625) == "6.25"


def test_allocate_proportional() -> None:
    assert allocate_proportional(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate_proportional(0, [0, 0]) == [0, 0]
    assert allocate_proportional(7, [0, 7]) == [0, 7]
