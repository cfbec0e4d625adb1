"""A fresh gateway home for one benchmark run: free ports, the chosen broker, the simulated
manufacturer trusted, and its firmware on the allow-list."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config import CONFIG_NAME, Settings, load_settings
from gateway.home import init_home

__all__ = ["make_bench_home", "set_setting"]

_TABLE = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+\s*(#.*)?$")


def set_setting(text: str, table: str, key: str, value: str) -> str:
    """``text`` (a fleetgate.toml) with ``key`` of ``[table]`` set to the TOML literal
    ``value``, keeping every comment. Raises ``KeyError`` when the key is not there: the
    benchmark must not silently run with a setting it believes it changed."""
    lines = text.splitlines(keepends=True)
    current = ""
    for index, line in enumerate(lines):
        header = _TABLE.match(line)
        if header:
            current = header.group(1)
            continue
        name, sep, rest = line.partition("=")
        if current == table and sep and name.strip() == key:
            comment = rest[rest.index("#") :] if "#" in rest else ""
            spacing = "  " if comment else ""
            lines[index] = f"{name.rstrip()} = {value}{spacing}{comment.rstrip()}\n"
            return "".join(lines)
    raise KeyError(f"[{table}] {key} not found in {CONFIG_NAME}")


def make_bench_home(
    folder: Path, *, broker: str, renew_fraction: float | None = None
) -> Settings:
    """Initialise ``folder`` as a gateway home for a benchmark (it must not hold one yet)."""
    from simulators.factory import allow_simulated_firmware, trust_factory

    if broker not in ("embedded", "mosquitto"):
        raise ValueError(f"broker must be embedded or mosquitto, not {broker!r}")
    init_home(folder, trust_domain="bench.fleetgate")
    path = folder / CONFIG_NAME
    text = path.read_text()
    text = set_setting(text, "broker", "kind", f'"{broker}"')
    text = set_setting(text, "broker", "enrollment_port", "0")
    text = set_setting(text, "broker", "operational_port", "0")
    if renew_fraction is not None:
        text = set_setting(text, "certificates", "renew_fraction", repr(float(renew_fraction)))
    path.write_text(text)
    allow_simulated_firmware(folder)
    settings = load_settings(folder)
    trust_factory(settings)
    return settings
