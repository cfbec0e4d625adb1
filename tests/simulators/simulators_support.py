"""Helpers for the simulator tests (a module of its own: conftest files are not imported)."""

from __future__ import annotations

from typing import Any

from gateway.service import Gateway
from simulators.modes import Mode, ModeOptions


def mode_options(gateway: Gateway, mode: Mode, devices: int, **changes: Any) -> ModeOptions:
    return ModeOptions(
        mode=mode,
        devices=devices,
        host="127.0.0.1",
        enrollment_port=gateway.ports.enrollment,
        operational_port=gateway.ports.operational,
        ca_pem=gateway.ca_chain_pem(),
        response_timeout=5.0,
        **changes,
    )
