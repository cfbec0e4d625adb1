from __future__ import annotations

from datetime import timedelta

import pytest

from pki.profile import (
    IDENTITY_NAME_PATTERN,
    IdentityKind,
    LeafTemplate,
    is_identity_name,
    parse_spiffe_id,
    spiffe_id,
)

HOUR = timedelta(hours=1)


@pytest.mark.parametrize("name", ["a", "sensor-0001", "A.b_c-9", "x" * 64])
def test_valid_identity_names(name: str) -> None:
    assert is_identity_name(name)
    assert spiffe_id("fleet.example", IdentityKind.DEVICE, name).endswith("/device/" + name)


@pytest.mark.parametrize(
    "name",
    ["", "-lead", ".hidden", "_x", "a/b", "a+b", "a#b", "a b", "x" * 65, "é", "a\n"],
)
def test_invalid_identity_names(name: str) -> None:
    assert not is_identity_name(name)
    with pytest.raises(ValueError):
        spiffe_id("fleet.example", IdentityKind.DEVICE, name)
    with pytest.raises(ValueError):
        LeafTemplate(IdentityKind.DEVICE, name, "fleet.example", HOUR)


def test_pattern_is_a_plain_string_for_other_modules() -> None:
    assert isinstance(IDENTITY_NAME_PATTERN, str)


def test_spiffe_id_round_trip() -> None:
    for kind in IdentityKind:
        uri = spiffe_id("fleet.example", kind, "alice-1")
        assert uri == f"spiffe://fleet.example/{kind.value}/alice-1"
        assert parse_spiffe_id(uri) == ("fleet.example", kind, "alice-1")


@pytest.mark.parametrize(
    "uri",
    [
        "https://fleet.example/device/a",
        "spiffe://fleet.example/robot/a",
        "spiffe://fleet.example/device",
        "spiffe://fleet.example/device/a/b",
        "spiffe://fleet.example/device/a?x=1",
        "spiffe://fleet.example/device/a#f",
        "spiffe://Fleet.Example/device/a",
        "spiffe://fleet.example:443/device/a",
        "spiffe://user@fleet.example/device/a",
        "spiffe:///device/a",
        "spiffe://fleet.example//device/a",
        "",
    ],
)
def test_parse_spiffe_id_rejects_foreign_uris(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_spiffe_id(uri)


def test_parse_spiffe_id_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        parse_spiffe_id(b"spiffe://fleet.example/device/a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "trust_domain", ["", "UPPER.example", "-x.example", "x-.example", "a..b", "a_b.example", "a.b."]
)
def test_trust_domain_must_be_lower_case_dns_labels(trust_domain: str) -> None:
    with pytest.raises(ValueError):
        LeafTemplate(IdentityKind.DEVICE, "d", trust_domain, HOUR)


def test_template_lifetime_floor_is_sixty_seconds() -> None:
    LeafTemplate(IdentityKind.DEVICE, "d", "fleet.example", timedelta(seconds=60))
    with pytest.raises(ValueError, match="lifetime"):
        LeafTemplate(IdentityKind.DEVICE, "d", "fleet.example", timedelta(seconds=59))
    with pytest.raises(TypeError):
        LeafTemplate(IdentityKind.DEVICE, "d", "fleet.example", 3600)  # type: ignore[arg-type]


def test_template_kind_must_be_an_identity_kind() -> None:
    with pytest.raises(TypeError):
        LeafTemplate("device", "d", "fleet.example", HOUR)  # type: ignore[arg-type]


def test_server_names_only_on_server_templates() -> None:
    with pytest.raises(ValueError, match="server"):
        LeafTemplate(IdentityKind.SERVICE, "b", "fleet.example", HOUR, dns_names=("localhost",))
    with pytest.raises(ValueError, match="server"):
        LeafTemplate(IdentityKind.SERVICE, "b", "fleet.example", HOUR, ip_addresses=("::1",))
    template = LeafTemplate(
        IdentityKind.SERVICE,
        "broker",
        "fleet.example",
        HOUR,
        server=True,
        dns_names=["localhost", "Broker.Example"],  # type: ignore[arg-type]
        ip_addresses=("127.0.0.1", "::1"),
    )
    assert template.dns_names == ("localhost", "Broker.Example")  # lists become tuples
    assert hash(template)


@pytest.mark.parametrize("dns", ["*.example", "a..b", "trailing.", "under_score", "x" * 300])
def test_bad_dns_names(dns: str) -> None:
    with pytest.raises(ValueError):
        LeafTemplate(
            IdentityKind.SERVICE, "b", "fleet.example", HOUR, server=True, dns_names=(dns,)
        )


@pytest.mark.parametrize("ip", ["256.0.0.1", "localhost", "1.2.3", ""])
def test_bad_ip_addresses(ip: str) -> None:
    with pytest.raises(ValueError):
        LeafTemplate(
            IdentityKind.SERVICE, "b", "fleet.example", HOUR, server=True, ip_addresses=(ip,)
        )


def test_a_bare_string_is_not_a_tuple_of_names() -> None:
    with pytest.raises(TypeError):
        LeafTemplate(
            IdentityKind.SERVICE,
            "b",
            "fleet.example",
            HOUR,
            server=True,
            dns_names="localhost",  # type: ignore[arg-type]
        )


def test_template_is_frozen() -> None:
    template = LeafTemplate(IdentityKind.DEVICE, "d", "fleet.example", HOUR)
    with pytest.raises(AttributeError):
        template.name = "other"  # type: ignore[misc]
    assert template.spiffe_id == "spiffe://fleet.example/device/d"
