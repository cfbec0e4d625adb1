"""Benchmark results for people: a table of the figures, then where and how they were measured."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

__all__ = ["FIGURES", "render"]

# The figures each benchmark's table shows, in order: (key, label, unit).
FIGURES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "enroll": (
        ("onboarded", "devices onboarded", ""),
        ("seconds", "first connect to last operational session", "s"),
        ("enroll_per_s", "onboarding rate", "/s"),
        ("p50_ms", "latency p50 (connect to operational session)", "ms"),
        ("p95_ms", "latency p95", "ms"),
        ("p99_ms", "latency p99", "ms"),
        ("idle_p50_ms", "one device on an idle gateway, p50", "ms"),
        ("server_cpu_ms_per_device", "server CPU per device (gateway + broker)", "ms"),
        ("floor_enroll_cpu_ms", "floor: in-process enrollment", "ms"),
        ("floor_handshake_enrollment_ms", "floor: enrollment TLS handshake", "ms"),
        ("floor_handshake_operational_ms", "floor: operational mTLS handshake", "ms"),
        ("floor_cpu_ms_per_device", "floor per device", "ms"),
        ("cpu_vs_floor", "server CPU / floor", "x"),
        ("floor_enroll_cpu_ms_under_load", "floor's enrollment, measured under the fleet", "ms"),
        ("cpu_vs_floor_under_load", "server CPU / floor with that enrollment", "x"),
        ("ceiling_per_s", "ceiling (all cores at the floor)", "/s"),
        ("peak_rss_kb", "peak RSS (gateway + broker)", "kB"),
        ("rss_kb_per_device", "RSS per connected device", "kB"),
        ("failed", "devices refused for good", ""),
    ),
    "revoke": (
        ("onboarded", "devices connected", ""),
        ("revoked", "revoked one at a time", ""),
        ("revoke_cut_p50_ms", "revoke call to session cut, p50", "ms"),
        ("revoke_cut_p99_ms", "revoke call to session cut, p99", "ms"),
        ("revoke_refused_p50_ms", "revoke call to refused reconnect, p50", "ms"),
        ("revoke_refused_p99_ms", "revoke call to refused reconnect, p99", "ms"),
        ("missed_cut", "cuts not seen in time", ""),
        ("missed_refusal", "refusals not seen in time", ""),
        ("quarantined", "quarantined one at a time", ""),
        ("quarantine_p50_ms", "quarantine applied, p50", "ms"),
        ("quarantine_p99_ms", "quarantine applied, p99", "ms"),
        ("quarantine_verified", "devices that then lost their rights", ""),
    ),
    "soak": (
        ("onboarded", "devices operational", ""),
        ("onboard_complete", "every device onboarded before the soak", ""),
        ("soak_seconds", "soak duration", "s"),
        ("renewals_during_soak", "renewals", ""),
        ("renewals_per_s", "renewal rate", "/s"),
        ("renewal_p50_ms", "renewal latency p50", "ms"),
        ("renewal_p99_ms", "renewal latency p99", "ms"),
        ("failures", "refusals and failed devices", ""),
        ("expiry_disconnects", "disconnects caused by expiry", ""),
        ("cut", "sessions cut by the broker", ""),
        ("server_cpu_percent", "server CPU during the soak", "%"),
        ("server_cpu_ms_per_renewal", "server CPU per renewal", "ms"),
        ("peak_rss_kb", "peak RSS (gateway + broker)", "kB"),
    ),
}


def _value(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3g}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text} {unit}".rstrip()


def render(result: dict[str, Any]) -> Group:
    bench = str(result.get("bench", ""))
    parameters = result.get("parameters", {})
    figures = Table(title=f"fleetgate bench {bench} ({parameters.get('broker', '?')} broker)")
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    for key, label, unit in FIGURES.get(bench, ()):
        if key in result:
            figures.add_row(label, _value(result[key], unit))
    context = Table(title="measured on", show_header=False)
    context.add_column("what")
    context.add_column("value")
    context.add_row("date", str(result.get("date", "")))
    for key, value in result.get("machine", {}).items():
        context.add_row(key, str(value))
    for key, value in result.get("versions", {}).items():
        context.add_row(key, str(value))
    for key, value in parameters.items():
        context.add_row(f"--{key.replace('_', '-')}", str(value))
    return Group(figures, context)
