"""The wire codec: every message round-trips, and every kind of bad payload gets its reason."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import (
    MAX_PAYLOAD,
    Challenge,
    Enroll,
    Error,
    Firmware,
    Hello,
    IssuedCertificate,
    Pending,
    ProtocolError,
    ReasonCode,
    Renew,
    TokenEnroll,
    decode_request,
    decode_response,
    encode,
)
from gateway.protocol.messages import MAX_LIFETIME, MIN_LIFETIME

FW = Firmware(version="2.4.1-rc1", digest="ab" * 32)
DER = b"\x30\x82\x01\x00" + bytes(range(200))
NONCE = bytes(range(32))

REQUESTS: list[Any] = [
    Hello(id="h-1", chain=(DER, DER + b"x")),
    Enroll(
        id="e_1",
        nonce=NONCE,
        device_nonce=bytes(16),
        csr=DER,
        chain=(DER,),
        firmware=FW,
        time=1_767_225_600,
        evidence=b"\x30\x45" + bytes(69),
    ),
    TokenEnroll(id="t1", token="A" * 32, csr=DER, time=0),
    TokenEnroll(id="t2", token="tok_-" * 4, csr=DER, time=5, firmware=FW),
    Renew(id="r1", csr=DER, time=1_767_225_600, signature=b"sig"),
    Renew(id="r2", csr=DER, time=1, signature=b"sig", firmware=FW),
    Enroll(
        id="e_2",
        nonce=NONCE,
        device_nonce=bytes(16),
        csr=DER,
        chain=(DER,),
        firmware=FW,
        time=1_767_225_600,
        evidence=b"sig",
        lifetime=60,
    ),
    TokenEnroll(id="t3", token="A" * 32, csr=DER, time=0, lifetime=MAX_LIFETIME),
    Renew(id="r3", csr=DER, time=1, signature=b"sig", firmware=FW, lifetime=3600),
]
RESPONSES: list[Any] = [
    Challenge(id="h-1", nonce=NONCE, expires_at=1_767_225_660),
    IssuedCertificate(
        id="e_1", certificate=DER, chain=(DER, DER), not_after=2_000_000_000, renew_after=1
    ),
    Pending(id="e_1", retry_after=10),
    Error(id="e_1", reason=ReasonCode.NONCE_EXPIRED, detail="ask again"),
    Error(id=None, reason="malformed", detail=""),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hello_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"v": 1, "type": "hello", "id": "req-1", "chain": [b64(DER)]}
    doc.update(changes)
    return doc


def enroll_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode(REQUESTS[1]))
    doc.update(changes)
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def refused(payload: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_request(payload)
    return caught.value


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: f"{m.TYPE}-{m.id}")
def test_requests_round_trip(message: Any) -> None:
    assert decode_request(encode(message)) == message


@pytest.mark.parametrize("message", RESPONSES, ids=lambda m: f"{m.TYPE}-{m.id}")
def test_responses_round_trip(message: Any) -> None:
    assert decode_response(encode(message)) == message


def test_encoding_is_compact_ordered_and_standard_base64() -> None:
    payload = encode(Challenge(id="x", nonce=b"\xfb\xff" * 16, expires_at=7))
    assert payload.startswith(b'{"v":1,"type":"challenge","id":"x","nonce":"')
    assert b" " not in payload
    # Standard alphabet with padding (+ and /), not the URL-safe one.
    assert json.loads(payload)["nonce"] == base64.b64encode(b"\xfb\xff" * 16).decode()
    assert encode(Challenge(id="x", nonce=b"\xfb\xff" * 16, expires_at=7)) == payload


def test_error_with_unknown_request_id_is_null_on_the_wire() -> None:
    doc = json.loads(encode(Error(id=None, reason="malformed")))
    assert doc["id"] is None
    assert doc["reason"] == "malformed"


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"not json", b'{"v":1,', b"\xff\xfe{}", b"{'v': 1}", b'{"v":1}{"v":1}'],
    ids=["empty", "open-brace", "text", "truncated", "not-utf8", "single-quotes", "two-docs"],
)
def test_unparsable_payloads_are_malformed(payload: bytes) -> None:
    assert refused(payload).code is ReasonCode.MALFORMED


@pytest.mark.parametrize("document", [[], [1, 2], "hello", 42, None, True])
def test_a_message_must_be_an_object(document: Any) -> None:
    assert refused(raw(document)).code is ReasonCode.MALFORMED


def test_duplicate_keys_are_malformed() -> None:
    payload = b'{"v":1,"type":"hello","id":"a","id":"b","chain":[]}'
    assert refused(payload).code is ReasonCode.MALFORMED


def test_oversized_payload_is_refused_before_parsing() -> None:
    payload = b"{" + b" " * MAX_PAYLOAD + b"}"
    error = refused(payload)
    assert error.code is ReasonCode.PAYLOAD_TOO_LARGE
    assert str(MAX_PAYLOAD) in error.detail


def test_payload_of_exactly_the_cap_is_parsed() -> None:
    body = raw(hello_doc())
    padded = body[:-1] + b" " * (MAX_PAYLOAD - len(body)) + b"}"
    assert len(padded) == MAX_PAYLOAD
    assert isinstance(decode_request(padded), Hello)


@pytest.mark.parametrize(
    "number",
    [
        b"1e400",
        b"-1e400",
        b"1" + b"0" * 10_000,
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1." + b"1" * 40,
    ],
    ids=["1e400", "-1e400", "10**10000", "NaN", "Infinity", "-Infinity", "long-float"],
)
def test_absurd_numbers_are_invalid_fields(number: bytes) -> None:
    payload = b'{"v":1,"type":"renew","id":"r","time":' + number + b"}"
    assert refused(payload).code is ReasonCode.INVALID_FIELD


def test_huge_numbers_elsewhere_are_refused_too() -> None:
    payload = b'{"v":1,"type":"hello","id":"r","chain":[],"extra":[' + b"9" * 5000 + b"]}"
    assert refused(payload).code is ReasonCode.INVALID_FIELD


@pytest.mark.parametrize("depth", [5, 100, 20_000])
def test_deep_nesting_is_an_invalid_field_not_a_crash(depth: int) -> None:
    payload = b'{"v":1,"type":"hello","id":"deep","x":' + b"[" * depth + b"]" * depth + b"}"
    error = refused(payload)
    assert error.code is ReasonCode.INVALID_FIELD
    assert "deep" in error.detail


def test_unknown_fields_are_ignored() -> None:
    assert decode_request(raw(hello_doc(comment={"any": ["thing"]}))) == Hello(
        id="req-1", chain=(DER,)
    )


def test_missing_version_is_an_invalid_field() -> None:
    doc = hello_doc()
    del doc["v"]
    assert refused(raw(doc)).code is ReasonCode.INVALID_FIELD


@pytest.mark.parametrize("version", [0, 2, 99])
def test_other_versions_are_unsupported_and_echo_the_id(version: int) -> None:
    error = refused(raw(hello_doc(v=version)))
    assert error.code is ReasonCode.UNSUPPORTED_VERSION
    assert error.request_id == "req-1"


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_version_of_the_wrong_type_is_an_invalid_field(version: Any) -> None:
    assert refused(raw(hello_doc(v=version))).code is ReasonCode.INVALID_FIELD


@pytest.mark.parametrize("kind", ["goodbye", "challenge", "certificate", "HELLO", ""])
def test_unknown_request_types(kind: str) -> None:
    error = refused(raw(hello_doc(type=kind)))
    assert error.code is ReasonCode.UNKNOWN_TYPE
    assert error.request_id == "req-1"


@pytest.mark.parametrize("kind", [None, 1, ["hello"]])
def test_type_of_the_wrong_type_is_an_invalid_field(kind: Any) -> None:
    assert refused(raw(hello_doc(type=kind))).code is ReasonCode.INVALID_FIELD


@pytest.mark.parametrize("request_id", ["", "x" * 65, "a b", "a/b", "é", 7, None, ["a"]])
def test_bad_request_ids_are_invalid_fields_and_not_echoed(request_id: Any) -> None:
    error = refused(raw(hello_doc(id=request_id)))
    assert error.code is ReasonCode.INVALID_FIELD
    assert error.request_id is None


def test_missing_request_id_is_an_invalid_field() -> None:
    doc = hello_doc()
    del doc["id"]
    assert refused(raw(doc)).code is ReasonCode.INVALID_FIELD


@pytest.mark.parametrize(
    "field",
    ["nonce", "device_nonce", "csr", "chain", "firmware", "time", "evidence"],
)
def test_every_enroll_field_is_required(field: str) -> None:
    doc = enroll_doc()
    del doc[field]
    error = refused(raw(doc))
    assert error.code is ReasonCode.INVALID_FIELD
    assert field in error.detail
    assert error.request_id == "e_1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time", "1767225600"),
        ("time", 1.5),
        ("time", True),
        ("time", -1),
        ("time", 10**14),
        ("nonce", 12345),
        ("nonce", b64(bytes(8))),
        ("nonce", b64(bytes(65))),
        ("device_nonce", b64(bytes(15))),
        ("csr", ""),
        ("csr", [b64(DER)]),
        ("chain", b64(DER)),
        ("chain", []),
        ("chain", [b64(DER)] * 5),
        ("chain", [1]),
        ("firmware", "1.0"),
        ("firmware", {"version": "1.0"}),
        ("firmware", {"version": "1.0", "digest": "AB" * 32}),
        ("firmware", {"version": "1.0", "digest": "ab" * 31}),
        ("firmware", {"version": "", "digest": "ab" * 32}),
        ("firmware", {"version": "x\n", "digest": "ab" * 32}),
        ("firmware", {"version": 1, "digest": "ab" * 32}),
        ("evidence", None),
    ],
)
def test_wrong_types_and_values_are_invalid_fields(field: str, value: Any) -> None:
    error = refused(raw(enroll_doc(**{field: value})))
    assert error.code is ReasonCode.INVALID_FIELD
    assert error.request_id == "e_1"


# -- lifetime: an optional wish on enroll, token_enroll and renew ---------------------------

LIFETIME_REQUESTS = {"enroll": REQUESTS[1], "token_enroll": REQUESTS[2], "renew": REQUESTS[4]}


@pytest.mark.parametrize("kind", LIFETIME_REQUESTS)
def test_lifetime_is_on_the_wire_only_when_asked_for(kind: str) -> None:
    plain = LIFETIME_REQUESTS[kind]
    assert "lifetime" not in json.loads(encode(plain))
    assert plain.lifetime is None and decode_request(encode(plain)) == plain
    for seconds in (MIN_LIFETIME, 3600, MAX_LIFETIME):
        asking = dataclasses.replace(plain, lifetime=seconds)
        assert json.loads(encode(asking))["lifetime"] == seconds
        assert decode_request(encode(asking)) == asking


@pytest.mark.parametrize("kind", LIFETIME_REQUESTS)
@pytest.mark.parametrize(
    "value",
    [0, 59, -60, MAX_LIFETIME + 1, "3600", True, 60.0, None, [60], {"seconds": 60}],
    ids=repr,
)
def test_a_bad_lifetime_is_an_invalid_field(kind: str, value: Any) -> None:
    doc = json.loads(encode(LIFETIME_REQUESTS[kind]))
    doc["lifetime"] = value
    error = refused(raw(doc))
    assert error.code is ReasonCode.INVALID_FIELD
    assert "lifetime" in error.detail
    assert error.request_id == doc["id"]


@pytest.mark.parametrize("kind", LIFETIME_REQUESTS)
def test_a_huge_lifetime_is_refused_while_parsing(kind: str) -> None:
    doc = json.loads(encode(LIFETIME_REQUESTS[kind]))
    doc["lifetime"] = 10**20
    assert refused(raw(doc)).code is ReasonCode.INVALID_FIELD


@pytest.mark.parametrize("value", [0, 59, MAX_LIFETIME + 1, True, "60", 60.5])
@pytest.mark.parametrize("kind", LIFETIME_REQUESTS)
def test_a_bad_lifetime_cannot_be_built(kind: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="lifetime"):
        dataclasses.replace(LIFETIME_REQUESTS[kind], lifetime=value)


@pytest.mark.parametrize(
    "text",
    [
        "AAEC!A==",  # not in the alphabet
        "AAECAw",  # truncated: padding missing
        "AAECA",  # truncated mid-quantum
        "AAECAw=",  # padding cut short
        "AAE CAw==",  # whitespace
        "-_-_",  # URL-safe alphabet
        "AAECAx==",  # non-zero padding bits: not the canonical spelling
    ],
)
def test_bad_base64_is_an_invalid_field(text: str) -> None:
    error = refused(raw(hello_doc(chain=[text])))
    assert error.code is ReasonCode.INVALID_FIELD
    assert "base64" in error.detail


def test_token_must_look_like_a_token() -> None:
    doc = json.loads(encode(REQUESTS[2]))
    for token in ("short", "has space in it!!", "x" * 129, 5):
        doc["token"] = token
        assert refused(raw(doc)).code is ReasonCode.INVALID_FIELD


def test_renew_signature_is_required() -> None:
    doc = json.loads(encode(REQUESTS[4]))
    del doc["signature"]
    assert refused(raw(doc)).code is ReasonCode.INVALID_FIELD


def test_responses_are_not_requests_and_vice_versa() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(encode(RESPONSES[0]))
    assert caught.value.code is ReasonCode.UNKNOWN_TYPE
    with pytest.raises(ProtocolError) as caught:
        decode_response(encode(REQUESTS[0]))
    assert caught.value.code is ReasonCode.UNKNOWN_TYPE


def test_response_ids_may_be_null_only_on_errors() -> None:
    doc = json.loads(encode(RESPONSES[2]))
    doc["id"] = None
    with pytest.raises(ProtocolError) as caught:
        decode_response(raw(doc))
    assert caught.value.code is ReasonCode.INVALID_FIELD


def test_unknown_reason_codes_survive_decoding() -> None:
    # A newer gateway may send codes this version has never heard of.
    payload = b'{"v":1,"type":"error","id":"a","reason":"brand_new_reason","detail":""}'
    message = decode_response(payload)
    assert isinstance(message, Error)
    assert message.reason == "brand_new_reason"


@pytest.mark.parametrize(
    "build",
    [
        lambda: Firmware(version="1", digest="AB" * 32),
        lambda: Hello(id="a", chain=()),
        lambda: Hello(id="a", chain=[DER]),  # type: ignore[arg-type]
        lambda: Pending(id="a", retry_after=-1),
        lambda: Pending(id="a", retry_after=True),
        lambda: Error(id="a", reason="Not Snake"),
        lambda: Error(id="a", reason="x", detail="d" * 2000),
        lambda: Challenge(id="a", nonce=b"short", expires_at=1),
    ],
)
def test_messages_validate_when_built(build: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        build()


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        encode("hello")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        decode_request(payload)
    except ProtocolError as error:
        assert isinstance(error.code, ReasonCode)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(["hello", "enroll", "token_enroll", "renew", "x"]),
    st.dictionaries(
        st.sampled_from(
            ["chain", "csr", "nonce", "time", "firmware", "token", "signature", "lifetime"]
        ),
        JSON,
    ),
)
def test_arbitrary_json_fields_raise_only_protocol_errors(
    kind: str, fields: dict[str, Any]
) -> None:
    doc = {"v": 1, "type": kind, "id": "fuzz", **fields}
    try:
        decode_request(raw(doc))
    except ProtocolError as error:
        assert error.code in (ReasonCode.INVALID_FIELD, ReasonCode.UNKNOWN_TYPE)
        # Number limits apply while parsing, before the id can be read.
        assert error.request_id in ("fuzz", None)
