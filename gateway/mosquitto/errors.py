"""Errors of the Mosquitto integration, each with a stable reason code for logs and the
console."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MosquittoError", "MosquittoReason"]


class MosquittoReason(StrEnum):
    MOSQUITTO_MISSING = "mosquitto_missing"  # no `mosquitto` binary on this machine
    PLUGIN_MISSING = "dynsec_plugin_missing"  # mosquitto_dynamic_security.so not found
    START_FAILED = "broker_start_failed"  # the process exited or never opened its listeners
    NOT_RUNNING = "broker_not_running"  # an operation that needs a started broker
    ADMIN_UNAVAILABLE = "admin_unavailable"  # the $CONTROL connection is down
    NO_RESPONSE = "dynsec_no_response"  # a command batch got no answer in time
    BAD_RESPONSE = "dynsec_bad_response"  # the answer was not what the plugin sends
    COMMAND_FAILED = "dynsec_command_failed"  # the plugin refused a command
    INVALID_CRL = "crl_invalid"  # not a PEM CRL
    CRL_EXPIRED = "crl_expired"  # nextUpdate passed: Mosquitto would refuse every client
    RELOAD_UNCONFIRMED = "reload_unconfirmed"  # SIGHUP sent, reload not seen in time


class MosquittoError(Exception):
    """Something the broker integration could not do; ``reason`` is stable, ``detail`` is for
    people. ``failures`` holds (command, error text) pairs of refused dynsec commands."""

    def __init__(
        self,
        reason: MosquittoReason,
        detail: str = "",
        *,
        failures: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.reason = MosquittoReason(reason)
        self.detail = detail
        self.failures = failures
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)

    def __repr__(self) -> str:
        return f"MosquittoError({self.reason.value!r}, {self.detail!r})"
