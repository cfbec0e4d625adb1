"""``fleetgate bench fuzz``: generated and mutated payloads through the gateway's decoder and
enrollment state machine, counting crashes.

The target is ``EnrollmentService.handle`` on an in-memory registry, the way the transport calls
it. Payloads come from three sources, mixed by a seeded generator (a run is repeatable):

- random bytes;
- random JSON documents built from the protocol's own vocabulary (types, field names, values of
  every JSON type, huge numbers, deep nesting);
- mutations of valid ``hello``, ``enroll``, ``token_enroll`` and ``renew`` requests (made for a
  real birth certificate, a live nonce, a live token and a current operational key): bit flips,
  truncation, insertions, field removal and swaps, type changes, broken base64, and bit flips
  inside the DER of certificates and CSRs, re-encoded, so the X.509 parsers see them too. Half
  of the mutants get a fresh request id so they are judged afresh rather than refused as a
  reused id.

A crash is anything but one decodable answer for a request topic (nothing for other topics):
``handle`` raising, or ``handle`` containing an exception itself (its ``errors.internal``
counter: the device would have been told ``unavailable`` for a request that deserved a
decision). Every ``EPOCH`` payloads the registry, CA and corpus are made anew, which bounds
memory and brings back live nonces and tokens.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import re
import string
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from gateway.enrollment.testing import LoopbackGateway, build_enroll, build_renew, hello_for
from gateway.protocol import topics
from gateway.protocol.codec import decode_response, encode
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import (
    Challenge,
    Error,
    IssuedCertificate,
    Pending,
    TokenEnroll,
)
from gateway.protocol.topics import Channel, parse_request_topic

__all__ = ["EPOCH", "render_fuzz", "run_fuzz"]

EPOCH = 2000
MAX_CRASH_SAMPLES = 10
_SERVICE_LOGGER = "gateway.enrollment.service"
_TYPES = ("hello", "enroll", "token_enroll", "renew", "challenge", "certificate", "error", "x")
_FIELDS = (
    "v", "type", "id", "chain", "csr", "nonce", "device_nonce", "firmware", "time", "evidence",
    "token", "signature", "lifetime", "version", "digest",
)
_BINARY_FIELDS = ("chain", "csr", "nonce", "device_nonce", "evidence", "signature")


@dataclass(frozen=True)
class _Sample:
    """One valid request and where it goes."""

    topic: str
    document: dict[str, Any]


class _Corpus:
    """Valid requests against a fresh in-memory gateway: the seeds every mutation starts from."""

    def __init__(self, seed: int) -> None:
        gw = LoopbackGateway(seed=seed)
        self.gateway = gw
        now = gw.now()
        newcomer = gw.mint("fz-new")
        challenge = gw.challenge(newcomer, "fz-hello-0")
        enroll, _ = build_enroll(newcomer, challenge.nonce, time=now, request_id="fz-enroll")
        member = gw.mint("fz-member")
        first = gw.challenge(member, "fz-hello-1")
        member_enroll, member_key = build_enroll(
            member, first.nonce, time=now, request_id="fz-enroll-1"
        )
        answer = gw.ask("fz-member", member_enroll)
        assert isinstance(answer, IssuedCertificate), answer
        renew, _ = build_renew("fz-member", member_key, time=now, request_id="fz-renew")
        token = gw.create_token("fz-token")
        token_enroll = TokenEnroll(
            id="fz-token-1", token=token, csr=enroll.csr, time=now, firmware=enroll.firmware
        )
        self.samples = (
            _Sample(topics.enroll_request("fz-new"), _document(hello_for(newcomer, "fz-h"))),
            _Sample(topics.enroll_request("fz-new"), _document(enroll)),
            _Sample(topics.enroll_request("fz-token"), _document(token_enroll)),
            _Sample(topics.renew_request("fz-member"), _document(renew)),
        )


def _document(message: Any) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(encode(message))
    return loaded


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# -- generated payloads -----------------------------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 3 else 8)
    match choice:
        case 0:
            return None
        case 1:
            return rng.random() < 0.5
        case 2:
            return rng.randint(-(2**31), 2**31)
        case 3:
            return rng.choice([0, -1, 1, 2**53, 10**15, 10**16, 2**64, -(10**20)])
        case 4:
            return rng.uniform(-1e6, 1e6)
        case 5:
            return "".join(rng.choices(string.printable, k=rng.randrange(0, 40)))
        case 6:
            return base64.b64encode(rng.randbytes(rng.randrange(0, 80))).decode()
        case 7:
            return rng.choice(_TYPES)
        case 8 | 9:
            return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
        case _:
            keys = rng.sample(_FIELDS, rng.randrange(0, 4))
            return {key: _random_value(rng, depth + 1) for key in keys}


def _generated(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return rng.randbytes(rng.randrange(0, 200))
    if roll < 0.4:
        depth = rng.choice([5, 50, 5000])
        return b'{"v":1,"type":"hello","id":"deep","chain":' + b"[" * depth + b"]" * depth + b"}"
    document: dict[str, Any] = {"v": rng.choice([1, 1, 1, 2, "1", None]),
                                "type": rng.choice(_TYPES),
                                "id": rng.choice(["g1", "", "a" * 65, "bad id", 7])}
    for key in rng.sample(_FIELDS[3:], rng.randrange(0, 8)):
        document[key] = _random_value(rng)
    return _dumps(document)


# -- mutations of valid requests --------------------------------------------------------------


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    mutable = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        position = rng.randrange(len(mutable))
        mutable[position] ^= 1 << rng.randrange(8)
    return bytes(mutable)


def _byte_mutation(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return rng.randbytes(4)
    position = rng.randrange(len(data))
    match rng.randrange(5):
        case 0:
            return _flip_bits(data, rng)
        case 1:
            return data[:position]  # truncated
        case 2:
            return data[:position] + rng.randbytes(rng.randrange(1, 8)) + data[position:]
        case 3:
            return data[:position] + data[position + rng.randrange(1, 16) :]
        case _:
            return data[:position] + data[position : position + 32] * 2 + data[position:]


def _mutate_der(value: Any, rng: random.Random) -> Any:
    """Flip bits inside the DER behind a base64 field and encode it again: the parsers of
    certificates and CSRs, not the base64 check, see the damage."""
    if not isinstance(value, str):
        return value  # an earlier mutation changed its type already
    try:
        der = base64.b64decode(value, validate=True)
    except ValueError:
        return value
    if rng.random() < 0.3 and len(der) > 8:
        # Aim at the first hundred bytes, where versions, lengths and algorithm ids live.
        head = der[:100]
        return base64.b64encode(_flip_bits(head, rng) + der[100:]).decode()
    return base64.b64encode(_byte_mutation(der, rng)).decode()


def _break_base64(value: str, rng: random.Random) -> str:
    match rng.randrange(4):
        case 0:
            return value[: max(0, len(value) - rng.randrange(1, 4))]  # truncated
        case 1:
            return value.rstrip("=")  # no padding
        case 2:
            return value.replace("+", "-").replace("/", "_")  # URL-safe alphabet
        case _:
            position = rng.randrange(len(value)) if value else 0
            return value[:position] + rng.choice("!*. \n=") + value[position + 1 :]


def _mutate_field(document: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    document = dict(document)
    keys = list(document)
    key = rng.choice(keys)
    match rng.randrange(7):
        case 0:
            del document[key]
        case 1:
            document[key] = _random_value(rng)  # another type
        case 2:
            other = rng.choice(keys)
            document[key], document[other] = document[other], document[key]
        case 3:
            binary = [k for k in keys if k in _BINARY_FIELDS]
            if binary:
                name = rng.choice(binary)
                value = document[name]
                if isinstance(value, list) and value:
                    index = rng.randrange(len(value))
                    value = list(value)
                    value[index] = _mutate_der(value[index], rng)
                    document[name] = value
                elif isinstance(value, str):
                    document[name] = _mutate_der(value, rng)
        case 4:
            binary = [k for k in keys if k in _BINARY_FIELDS and isinstance(document[k], str)]
            if binary:
                name = rng.choice(binary)
                document[name] = _break_base64(document[name], rng)
        case 5:
            document[rng.choice(_FIELDS)] = _random_value(rng)  # an extra or replaced field
        case _:
            document[key] = [document[key]] if rng.random() < 0.5 else {"x": document[key]}
    return document


def _mutated(sample: _Sample, rng: random.Random, serial: int) -> tuple[str, bytes]:
    document = dict(sample.document)
    if rng.random() < 0.5:
        document["id"] = f"m{serial}"  # judged afresh, not refused as a reused request id
    for _ in range(rng.randrange(1, 3)):
        document = _mutate_field(document, rng)
    payload = _dumps(document)
    roll = rng.random()
    if roll < 0.25:
        payload = _byte_mutation(payload, rng)
    elif roll < 0.3:
        # A duplicated key, which json.dumps cannot produce.
        payload = payload[:-1] + b',"id":"dup"}'
    topic = sample.topic
    if rng.random() < 0.1:
        device = parse_request_topic(topic)
        assert device is not None
        topic = rng.choice(
            [
                topics.request_topic(Channel.RENEW, device.device_id),
                topics.request_topic(Channel.ENROLL, device.device_id),
                topics.enroll_request("fz-other"),
                topic + "/x",
                "fg/v1/enroll/+/req",
            ]
        )
    return topic, payload


# -- the run ----------------------------------------------------------------------------------


class _CrashLog(logging.Handler):
    """Keeps the exceptions ``handle`` contained, as short signatures."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.signatures: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.signatures[_signature(record.exc_info[1])] += 1


def _signature(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].name}" if frames else "?"
    # Digits vary between payloads that hit the same fault; one line per fault is enough.
    message = re.sub(r"\b\d+\b", "N", str(error))[:80]
    return f"{type(error).__name__} in {where}: {message}"


def _outcome(reply_payload: bytes) -> str:
    answer = decode_response(reply_payload)
    match answer:
        case Error():
            return f"error.{answer.reason}"
        case Challenge():
            return "challenge"
        case IssuedCertificate():
            return "certificate"
        case Pending():
            return "pending"
    return type(answer).__name__


def _judge(topic: str, replies: list[Any]) -> str:
    """The answer's kind; ValueError unless a request topic got exactly one decodable answer
    and any other topic none."""
    if parse_request_topic(topic) is None:
        if replies:
            raise ValueError(f"answered a non-request topic {topic[:40]!r}")
        return "ignored"
    if len(replies) != 1:
        raise ValueError(f"{len(replies)} answers to one request")
    return _outcome(replies[0].payload)


def run_fuzz(
    count: int,
    seed: int = 0,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Feed ``count`` payloads through ``EnrollmentService.handle``; return counts, time, rate,
    crashes (with up to ``MAX_CRASH_SAMPLES`` distinct signatures) and the answers given."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError("count must be an int")
    if count < 1:
        raise ValueError("count must be at least 1")
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    crashes = 0
    signatures: Counter[str] = Counter()
    crash_log = _CrashLog()
    logger = logging.getLogger(_SERVICE_LOGGER)
    saved = (logger.level, logger.propagate)
    logger.addHandler(crash_log)
    # A contained exception is counted here; printing a traceback per payload would only
    # measure the terminal.
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    corpus: _Corpus | None = None
    started = time.perf_counter()
    try:
        for index in range(count):
            if index % EPOCH == 0:
                corpus = _Corpus(rng.randrange(2**32))
                if progress is not None and index:
                    progress(index)
            assert corpus is not None
            service = corpus.gateway.service
            roll = rng.random()
            if roll < 0.25:
                topic = rng.choice([s.topic for s in corpus.samples])
                payload = _generated(rng)
            else:
                topic, payload = _mutated(rng.choice(corpus.samples), rng, index)
            internal = service.metrics["errors.internal"]
            try:
                replies = service.handle(topic, payload)
            except Exception as error:  # handle promises never to raise
                crashes += 1
                signatures[_signature(error)] += 1
                continue
            if service.metrics["errors.internal"] != internal:
                crashes += 1  # contained, and its signature caught by crash_log
                continue
            try:
                outcomes[_judge(topic, replies)] += 1
            except (ProtocolError, ValueError) as error:
                crashes += 1
                signatures[f"no decision: {error}"[:120]] += 1
    finally:
        logger.removeHandler(crash_log)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    seconds = time.perf_counter() - started
    signatures.update(crash_log.signatures)
    return {
        "count": count,
        "seed": seed,
        "seconds": round(seconds, 2),
        "rate": round(count / seconds, 1) if seconds > 0 else 0.0,
        "crashes": crashes,
        "crash_signatures": dict(signatures.most_common(MAX_CRASH_SAMPLES)),
        "outcomes": dict(outcomes.most_common()),
    }


def render_fuzz(result: dict[str, Any]) -> Table:
    table = Table(title=f"fuzz: {result['count']:,} payloads, seed {result['seed']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("seconds", f"{result['seconds']:,}")
    table.add_row("payloads/s", f"{result['rate']:,}")
    table.add_row("crashes", str(result["crashes"]))
    for signature, times in result["crash_signatures"].items():
        table.add_row(f"  {signature}", str(times))
    for outcome, times in result["outcomes"].items():
        table.add_row(f"answer {outcome}", f"{times:,}")
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.bench_fuzz --count N [--seed S]``: prints JSON; exit 1 on crashes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def report(done: int) -> None:
        if done % (EPOCH * 50) == 0:
            print(f"{done:,} payloads", file=sys.stderr, flush=True)

    result = run_fuzz(args.count, args.seed, progress=report)
    print(json.dumps(result, indent=2))
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
