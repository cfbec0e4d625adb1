"""Hostile enrollment requests over real TLS: each reaches the device as its typed error, on its
response topic, through the embedded broker.

The requests are built by the case builders of the in-process table
(tests/reliability/test_reliability_hostile.py, ``CASES``), against this gateway's own
manufacturer, CA, policy and registry: ``WireGateway`` offers the builders what
``LoopbackGateway`` offers them. What a builder needs before its hostile request (a challenge,
an earlier enrollment) goes in process through an ``EnrollmentService`` on the gateway's
registry, CA and policy; the hostile request itself goes over the wire.

One gateway serves every case. Between cases its stored answers and nonces are pruned (the
builders reuse request ids such as ``enroll-1``) and a device keeps one birth certificate (an
enrolled id is bound to it), so each case meets the gateway as it would alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import aiomqtt
import pytest

from gateway.enrollment.service import EnrollmentService
from gateway.enrollment.testing import DEFAULT_MODEL
from gateway.protocol import decode_response, encode, topics
from gateway.protocol.messages import Challenge, Request, Response
from gateway.protocol.topics import Channel
from gateway.service import Gateway
from pki.factory import BirthCredential, FactoryCA
from simulators.tls import server_auth_context

pytestmark = [pytest.mark.broker, pytest.mark.asyncio(loop_scope="module")]

HOSTILE = "test_reliability_hostile"


def hostile_table() -> ModuleType:
    """The in-process table's module: the one pytest imported if it did, else loaded by path
    under the same name (tests/reliability is on sys.path only when collected)."""
    module = sys.modules.get(HOSTILE)
    if module is None:
        path = Path(__file__).parents[1] / "reliability" / f"{HOSTILE}.py"
        spec = importlib.util.spec_from_file_location(HOSTILE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[HOSTILE] = module
        spec.loader.exec_module(module)
    return module


TABLE = hostile_table()
DEVICE: str = TABLE.DEVICE

# A representative set: a case for each check a hostile enrollee reaches, from the chain to
# the CSR. (nonce_expired needs the gateway's clock moved: proven in process.)
WIRE_CASES = (
    "broken_chain",  # chain_invalid
    "deny_listed",  # birth_cert_denied
    "unknown_manufacturer",
    "birth_expired",
    "nonce_never_issued",  # nonce_unknown
    "nonce_replayed",  # nonce_reused
    "nonce_of_another_device",  # nonce_other_device
    "evidence_by_another_key",  # evidence_signature_invalid
    "clock_skew",
    "csr_garbage",  # bad_encoding
    "csr_invalid_signature",  # bad_signature
    "csr_rsa_1024",  # key_not_allowed
    "csr_for_the_birth_key",  # forbidden_key
    "csr_duplicate_extension",
    "csr_ca_true",  # csr_overreach
    "csr_common_name_of_another_device",  # csr_overreach
)
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


class WireGateway:
    """What the hostile case builders use of a ``LoopbackGateway``, on a running gateway."""

    def __init__(self, gateway: Gateway, factory: FactoryCA) -> None:
        self.gateway = gateway
        self.factory = factory
        self.clock = gateway.clock
        self.store = gateway.store
        self.policy = gateway.policy
        self._credentials: dict[tuple[str, str], BirthCredential] = {}
        self._setup = self._service()

    def _service(self) -> EnrollmentService:
        # No rate limiter: the preparations are not what the case is about.
        return EnrollmentService(self.store, self.gateway.issuer, self.policy, self.clock)

    def mint(
        self, serial_number: str, model: str = DEFAULT_MODEL, **kwargs: Any
    ) -> BirthCredential:
        """One birth certificate per device (an enrolled device id is bound to it); with
        ``kwargs`` (other validity) a new one."""
        if kwargs:
            return self.factory.mint(serial_number, model, **kwargs)
        key = (serial_number, model)
        if key not in self._credentials:
            self._credentials[key] = self.factory.mint(serial_number, model)
        return self._credentials[key]

    def now(self) -> int:
        return int(self.clock.now().timestamp())

    def ask(
        self, device_id: str, request: Request | bytes, channel: Channel = Channel.ENROLL
    ) -> Response:
        payload = request if isinstance(request, bytes) else encode(request)
        (answer,) = self._setup.handle(topics.request_topic(channel, device_id), payload)
        return decode_response(answer.payload)

    def challenge(self, credential: BirthCredential, request_id: str = "hello-1") -> Challenge:
        hello = TABLE.hello_for(credential, request_id)
        answer = self.ask(credential.serial_number, hello)
        assert isinstance(answer, Challenge), answer
        return answer

    def with_policy(self, **changes: Any) -> EnrollmentService:
        """A policy change, as an operator's edit and restart would make it (``reset`` undoes
        it)."""
        self.policy = dataclasses.replace(self.policy, **changes)
        self.gateway.enrollment.replace_policy(self.policy)
        self._setup = self._service()
        return self._setup

    def reset(self) -> None:
        """Forget every stored answer and nonce, and any policy change of the last case."""
        while self.store.prune_responses(FAR_FUTURE, FAR_FUTURE, 1000):
            pass
        while self.store.prune_nonces(FAR_FUTURE, 1000):
            pass
        if self.policy is not self.gateway.policy:
            self.policy = self.gateway.policy
            self.gateway.enrollment.replace_policy(self.policy)
            self._setup = self._service()


@pytest.fixture(scope="module")
def wire(module_gateway: tuple[Gateway, FactoryCA]) -> WireGateway:
    return WireGateway(*module_gateway)


async def ask_over_tls(gateway: Gateway, device_id: str, payload: bytes) -> dict[str, Any]:
    """Publish ``payload`` as enrollee ``device_id`` and return the one answer on its topic."""
    async with aiomqtt.Client(
        "127.0.0.1",
        gateway.ports.enrollment,
        identifier=device_id,
        tls_context=server_auth_context(gateway.ca_chain_pem()),
        timeout=5,
    ) as mqtt:
        await mqtt.subscribe(topics.enroll_response(device_id), qos=1)
        await mqtt.publish(topics.enroll_request(device_id), payload, qos=1)
        message = await asyncio.wait_for(mqtt.messages.__aiter__().__anext__(), 5)
    assert str(message.topic) == topics.enroll_response(device_id)
    answer: dict[str, Any] = json.loads(bytes(message.payload))
    return answer


@pytest.mark.parametrize("name", WIRE_CASES)
async def test_a_hostile_request_over_tls_gets_its_reason_code(
    wire: WireGateway, name: str
) -> None:
    case, code = TABLE.CASES[name]
    wire.reset()
    device_id, channel, payload = case(wire)
    assert channel is Channel.ENROLL  # renewals need mutual TLS: not this listener
    metrics = wire.gateway.enrollment.metrics
    refused_before = metrics[f"rejected.{code.value}"]
    certificates_before = len(wire.store.certificates_for(device_id))

    answer = await ask_over_tls(wire.gateway, device_id, payload)

    assert answer["type"] == "error", answer
    assert answer["reason"] == code.value, answer.get("detail")
    assert metrics[f"rejected.{code.value}"] == refused_before + 1
    assert metrics["errors.internal"] == 0
    assert len(wire.store.certificates_for(device_id)) == certificates_before


async def test_every_wire_case_is_in_the_table_and_covers_the_asked_codes() -> None:
    codes = {TABLE.CASES[name][1].value for name in WIRE_CASES}
    asked = {
        "chain_invalid", "birth_cert_denied", "nonce_unknown", "nonce_reused",
        "nonce_other_device", "evidence_signature_invalid", "bad_encoding", "bad_signature",
        "forbidden_key", "csr_overreach",
    }  # fmt: skip
    assert asked <= codes
