"""``EnrollmentService``: the gateway side of protocol v1, without any I/O of its own.

The transport hands it ``(topic, payload)`` and publishes what it returns. Between the two:

    parse the topic -> decode once -> stored answer for (device, request id)?  -> replay it
                                   -> decide (hello / enroll / token_enroll / renew)
                                   -> commit row + response + audit in one transaction
                                   -> return the response to publish

The commit comes before the return, so a certificate is never published without its row, and a
retried request (the embedded broker may drop a QoS 1 message; devices retry with the same id) is
answered from the store byte for byte without consuming anything twice.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import random as random_module
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from gateway.enrollment.decide import Attempt, Decider, Decision
from gateway.enrollment.errors import EnrollmentRejected
from gateway.enrollment.policy import EnrollmentPolicy
from gateway.enrollment.publish import Publish
from gateway.enrollment.ratelimit import RateLimiter, RateVerdict
from gateway.faults import fault_point
from gateway.observe import CertificateIssued, Observation, Observer, RequestRefused
from gateway.protocol.codec import decode_request, encode
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import (
    MAX_DETAIL,
    Enroll,
    Error,
    Hello,
    Renew,
    Request,
    TokenEnroll,
)
from gateway.protocol.reasons import ReasonCode
from gateway.protocol.topics import Channel, RequestTopic, parse_request_topic
from gateway.store import (
    AuditEntry,
    DuplicateError,
    IdentityRecord,
    Store,
    StoredResponse,
    StoreError,
)
from pki.clock import Clock
from pki.csr import CsrPolicy
from pki.issue import Issuer

log = logging.getLogger(__name__)

_CHANNEL_OF: dict[type[Request], Channel] = {
    Hello: Channel.ENROLL,
    Enroll: Channel.ENROLL,
    TokenEnroll: Channel.ENROLL,
    Renew: Channel.RENEW,
}
MAX_TOKEN_TTL = timedelta(days=30)
MAX_REMEMBERED_ATTEMPTS = 4096
_AttemptKey = tuple[str, str, str]  # device id, request id, sha256 of the request bytes


def _replay(where: RequestTopic, stored: StoredResponse) -> Publish:
    """The stored answer again; a stored certificate still needs its holder admitted (the
    first publish may have failed before the broker knew the device)."""
    issued = stored.outcome == "issued"
    return Publish(where.response, stored.payload, issued_to=where.device_id if issued else None)


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class EnrollmentService:
    """Answers devices' enrollment and renewal requests; see the module docstring.

    ``metrics`` counts ``requests.<type>``, ``rejected.<reason>``, ``challenges``, ``issued``,
    ``renewed``, ``pending``, ``replayed``, ``ignored.topic`` and ``errors.internal``.

    With a ``rate_limiter``, a request over its device's or the total budget is answered
    ``rate_limited`` before anything else is done for it (see ``ratelimit``).

    ``handle`` may be called from several threads (each call is independent and the store is
    transactional); the counters are then best-effort.
    """

    def __init__(
        self,
        store: Store,
        issuer: Issuer,
        policy: EnrollmentPolicy,
        clock: Clock,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        random: random_module.Random | None = None,
        csr_policy: CsrPolicy | None = None,
        rate_limiter: RateLimiter | None = None,
        observer: Observer | None = None,
        lifetime_cap: Callable[[str], int | None] | None = None,
    ) -> None:
        """``observer`` hears of every certificate issued (behaviour baselines); it runs in
        the calling thread and what it raises is logged, never answered to the device.
        ``lifetime_cap``: see ``Decider``."""
        if not isinstance(policy, EnrollmentPolicy):
            raise TypeError("policy must be an EnrollmentPolicy")
        if rate_limiter is not None and not isinstance(rate_limiter, RateLimiter):
            raise TypeError("rate_limiter must be a RateLimiter or None")
        self._rate_limiter = rate_limiter
        self._store = store
        self._clock = clock
        self._random_bytes = random_bytes
        self._decider = Decider(
            store,
            issuer,
            policy,
            csr_policy=csr_policy or CsrPolicy(),
            random_bytes=random_bytes,
            rng=random or random_module.Random(),
            lifetime_cap=lifetime_cap,
        )
        self._observer = observer
        self.metrics: collections.Counter[str] = collections.Counter()
        # Requests that consumed their nonce or token but whose answer is not committed yet.
        self._consumed: collections.OrderedDict[_AttemptKey, None] = collections.OrderedDict()
        self._consumed_lock = threading.Lock()

    def replace_policy(self, policy: EnrollmentPolicy) -> None:
        """Apply a new policy to the next requests (e.g. a manufacturer root was added)."""
        if not isinstance(policy, EnrollmentPolicy):
            raise TypeError("policy must be an EnrollmentPolicy")
        self._decider.replace_policy(policy)

    # -- the wire ------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Publish]:
        """Answer one request: ``[]`` for a topic that is not a request topic, otherwise exactly
        one ``Publish`` to the device's response topic. Never raises."""
        where = parse_request_topic(topic) if isinstance(topic, str) else None
        if where is None:
            self.metrics["ignored.topic"] += 1
            return []
        try:
            if self._rate_limiter is not None:
                verdict = self._rate_limiter.check(where.device_id)
                if not verdict.allowed:
                    return [self._rate_limited(where, payload, verdict)]
            return [self._answer(where, payload)]
        except Exception:  # the last line of defence: a bug must not stop the gateway
            self.metrics["errors.internal"] += 1
            log.exception("enrollment request on %s failed", topic)
            return [self._unavailable(where, None, "internal error")]

    def _answer(self, where: RequestTopic, payload: bytes) -> Publish:
        now = self._clock.now()
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            return self._refuse(where, exc.request_id, "", exc.code, exc.detail, now)
        self.metrics[f"requests.{request.TYPE}"] += 1
        if _CHANNEL_OF[type(request)] is not where.channel:
            detail = f"{request.TYPE} is not accepted on the {where.channel} topic"
            return self._refuse(
                where, request.id, request.TYPE, ReasonCode.UNKNOWN_TYPE, detail, now
            )
        key = (where.device_id, request.id, _digest(payload))
        try:
            stored = self._store.get_response(where.device_id, request.id)
        except StoreError as exc:
            return self._unavailable(where, request.id, str(exc))
        if stored is not None and stored.request_digest != key[2]:
            detail = f"request id {request.id!r} was used for another request"
            return self._refuse(
                where, request.id, request.TYPE, ReasonCode.REQUEST_ID_REUSED, detail, now
            )
        if stored is not None and stored.outcome != "pending":
            self.metrics["replayed"] += 1
            return _replay(where, stored)
        with self._consumed_lock:
            resumed = stored is not None or key in self._consumed
        attempt = Attempt(resumed=resumed)
        try:
            decision = self._decide(where.device_id, request, now, attempt)
        except EnrollmentRejected as exc:
            self._remember(key, attempt)
            return self._refuse(where, request.id, request.TYPE, exc.code, exc.detail, now, key=key)
        except StoreError as exc:
            self._remember(key, attempt)
            return self._unavailable(where, request.id, str(exc))
        self._remember(key, attempt)
        if stored is not None and decision.outcome == "pending":
            # Still waiting for an operator: the same answer, and nothing new to record (a
            # device polling every few seconds must not fill the audit trail).
            self.metrics["replayed"] += 1
            return Publish(where.response, stored.payload)
        return self._commit(where, request, key, decision, now)

    def _remember(self, key: _AttemptKey, attempt: Attempt) -> None:
        """Keep in mind, until its answer is committed, that this request consumed its nonce
        or token; bounded, since a device that never retries never clears its entry."""
        if attempt.consumed:
            with self._consumed_lock:
                self._consumed[key] = None
                while len(self._consumed) > MAX_REMEMBERED_ATTEMPTS:
                    self._consumed.popitem(last=False)

    def _forget(self, key: _AttemptKey) -> None:
        with self._consumed_lock:
            self._consumed.pop(key, None)

    def _decide(
        self, device_id: str, request: Request, now: datetime, attempt: Attempt
    ) -> Decision:
        match request:
            case Hello():
                return self._decider.hello(device_id, request, now)
            case Enroll():
                return self._decider.enroll(device_id, request, now, attempt)
            case TokenEnroll():
                return self._decider.token_enroll(device_id, request, now, attempt)
            case Renew():
                return self._decider.renew(device_id, request, now)
        raise AssertionError(f"unhandled request {type(request).__name__}")

    def _commit(
        self,
        where: RequestTopic,
        request: Request,
        key: _AttemptKey,
        decision: Decision,
        now: datetime,
    ) -> Publish:
        payload = encode(decision.response)
        response = StoredResponse(
            identity_id=where.device_id,
            request_id=request.id,
            kind=request.TYPE,
            outcome=decision.outcome,
            payload=payload,
            at=now,
            request_digest=key[2],
        )
        try:
            self._store.record_outcome(
                response=response,
                identity=decision.identity,
                certificate=decision.certificate,
                audit=decision.audit,
                nonce=decision.nonce,
            )
        except DuplicateError:
            return self._after_duplicate(where, request, key, decision, now)
        except StoreError as exc:
            return self._unavailable(where, request.id, str(exc))
        self._forget(key)
        self.metrics[decision.metric] += 1
        issued = decision.certificate is not None
        if issued:
            fault_point("after_row_written")
            self._observe_issued(where.device_id, request, decision.identity)
        return Publish(
            where.response,
            payload,
            issued_to=where.device_id if issued else None,
            certificate=decision.certificate,
        )

    def _observe_issued(
        self, device_id: str, request: Request, registered: IdentityRecord | None
    ) -> None:
        firmware = getattr(request, "firmware", None)
        self._observe(
            CertificateIssued(
                identity=device_id,
                # a renewal is proven by the current certificate, not by fresh evidence
                attested=not isinstance(request, Renew),
                firmware_version=firmware.version if firmware is not None else None,
                firmware_digest=firmware.digest if firmware is not None else None,
                registered=registered,
            )
        )

    def _observe(self, observation: Observation) -> None:
        if self._observer is None:
            return
        try:
            self._observer(observation)
        except Exception:
            self.metrics["errors.observer"] += 1
            log.exception("the observer failed on %r", observation)

    def _after_duplicate(
        self,
        where: RequestTopic,
        request: Request,
        key: _AttemptKey,
        decision: Decision,
        now: datetime,
    ) -> Publish:
        """Another worker got there first (same request twice at once) or the key was
        certified in the meantime; the signed certificate is dropped unpublished."""
        try:
            answered = self._stored_answer(where, key)
            if answered is not None:
                return answered
            certificate = decision.certificate
            if certificate is not None and self._store.key_fingerprint_used(
                certificate.public_key_fingerprint
            ):
                return self._refuse(
                    where,
                    request.id,
                    request.TYPE,
                    ReasonCode.KEY_REUSED,
                    "this key was certified before; generate a new one",
                    now,
                    key=key,
                )
        except StoreError as exc:
            return self._unavailable(where, request.id, str(exc))
        return self._unavailable(where, request.id, "conflicting concurrent request")

    def _stored_answer(self, where: RequestTopic, key: _AttemptKey) -> Publish | None:
        """The final answer another worker stored for this very request, if there is one."""
        stored = self._store.get_response(where.device_id, key[1])
        if stored is None or stored.request_digest != key[2] or stored.outcome == "pending":
            return None
        self.metrics["replayed"] += 1
        return _replay(where, stored)

    def _refuse(
        self,
        where: RequestTopic,
        request_id: str | None,
        kind: str,
        code: ReasonCode,
        detail: str,
        now: datetime,
        *,
        key: _AttemptKey | None = None,
    ) -> Publish:
        """Answer with an error and audit the refusal. With ``key`` (a decision about a
        well-formed request) the answer is also stored, so a retry gets the same refusal."""
        payload = encode(Error(id=request_id, reason=code, detail=detail[:MAX_DETAIL]))
        entry = AuditEntry(
            actor=f"device:{where.device_id}",
            action="reject",
            subject=where.device_id,
            outcome="rejected",
            at=now,
            reasons=(code.value,),
            detail={
                "request": kind,
                "request_id": request_id or "",
                "channel": where.channel.value,
                "detail": detail[:200],
            },
        )
        try:
            if key is not None:
                self._store.record_outcome(
                    response=StoredResponse(
                        identity_id=where.device_id,
                        request_id=key[1],
                        kind=kind,
                        outcome="rejected",
                        payload=payload,
                        at=now,
                        request_digest=key[2],
                        reason=code.value,
                    ),
                    audit=[entry],
                )
            else:
                self._store.append_audit([entry])
        except DuplicateError:
            # Only record_outcome raises it: the same request, answered by another worker a
            # moment ago.
            assert key is not None
            try:
                answered = self._stored_answer(where, key)
            except StoreError as exc:
                return self._unavailable(where, request_id, str(exc))
            return answered or self._unavailable(where, request_id, "concurrent request")
        except StoreError as exc:
            return self._unavailable(where, request_id, str(exc))
        if key is not None:
            self._forget(key)
        self.metrics[f"rejected.{code.value}"] += 1
        self._observe(RequestRefused(where.device_id, code.value))
        return Publish(where.response, payload)

    def _rate_limited(self, where: RequestTopic, payload: bytes, verdict: RateVerdict) -> Publish:
        """Refuse without deciding anything. Nothing is stored (a later retry of the same
        request must be judged), and only the first refusal of a burst is audited: a flood must
        not turn into a flood of audit records."""
        try:
            request_id: str | None = decode_request(payload).id
        except ProtocolError as exc:
            request_id = exc.request_id
        self.metrics[f"rejected.{ReasonCode.RATE_LIMITED.value}"] += 1
        self._observe(RequestRefused(where.device_id, ReasonCode.RATE_LIMITED.value))
        wait = max(1, round(verdict.retry_after))
        detail = f"too many requests ({verdict.scope} limit); retry in about {wait} s"
        if verdict.first:
            entry = AuditEntry(
                actor=f"device:{where.device_id}",
                action="reject",
                subject=where.device_id,
                outcome="rejected",
                at=self._clock.now(),
                reasons=(ReasonCode.RATE_LIMITED.value,),
                detail={
                    "request_id": request_id or "",
                    "channel": where.channel.value,
                    "scope": str(verdict.scope),
                },
            )
            try:
                self._store.append_audit([entry])
            except StoreError as exc:
                # The refusal stands; a registry outage must not turn a limit into a crash.
                log.warning("could not audit the rate limit of %s: %s", where.device_id, exc)
        error = Error(id=request_id, reason=ReasonCode.RATE_LIMITED, detail=detail)
        return Publish(where.response, encode(error))

    def _unavailable(self, where: RequestTopic, request_id: str | None, why: str) -> Publish:
        # Nothing is stored or audited: the store is what failed. The device retries the same
        # request, which is safe.
        log.warning("answering unavailable to %s: %s", where.device_id, why)
        self.metrics[f"rejected.{ReasonCode.UNAVAILABLE.value}"] += 1
        error = Error(
            id=request_id, reason=ReasonCode.UNAVAILABLE, detail="registry unavailable; retry"
        )
        return Publish(where.response, encode(error))
