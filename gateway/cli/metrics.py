"""`fleetgate metrics`: the counters of the gateway running in a home, read from the file it
rewrites every 10 s (``<home>/metrics.prom``, see gateway.metrics_export): refusals by reason
code, requests, what the broker turned away. Reads the file only: no passphrase, no registry,
nothing asked of the gateway."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gateway.cli.common import (
    HomeOption,
    JsonOption,
    console,
    fail,
    print_json,
    resolve_home,
)
from gateway.cluster.names import NODE_NAME, NODE_NAME_RULE
from gateway.metrics_export import (
    EXPORT_SECONDS,
    SECTIONS,
    STALE_SECONDS,
    MetricsFileError,
    MetricsFileReason,
    MetricsSnapshot,
    metrics_path,
    read_metrics,
)

NodeOption = Annotated[
    str | None,
    typer.Option(
        "--node",
        help="Gateways of a cluster sharing this home write one file each "
        "(metrics-<node>.prom): the node to show.",
        show_default=False,
    ),
]
# counters an operator looks at first: something was turned away or went wrong
_ALARMING = ("rejected.", "refused.", "denied.", "errors.", "clones")


def metrics_command(
    home: HomeOption = None, node: NodeOption = None, as_json: JsonOption = False
) -> None:
    """Show the counters of the gateway running in this home (exit 1 if it wrote none)."""
    path = _metrics_file(resolve_home(home), node)
    try:
        snapshot = read_metrics(path)
    except MetricsFileError as exc:
        # escaped: a path or a file's line may hold what rich would take for markup
        if exc.reason is MetricsFileReason.MISSING:
            fail(
                f"no metrics file at {escape(str(path))}: is the gateway running? "
                f"(a running gateway writes one every {EXPORT_SECONDS:.0f} s)"
            )
        fail(f"cannot read the metrics file: {escape(exc.detail)}")
    age = max(0.0, time.time() - snapshot.at.timestamp())
    if as_json:
        print_json(_as_json(snapshot, path, age))
    else:
        _print(snapshot, path, age)


def _metrics_file(home: Path, node: str | None) -> Path:
    """The file to read: ``--node``'s; else the home's single gateway's; else, when only one
    gateway of a cluster writes here, or only one of those that wrote here still runs, its
    file (a gateway that stopped cleanly says so in its file; one killed stops writing)."""
    if node is not None:
        # the names a gateway of a cluster accepts: they also keep the file inside the home
        if NODE_NAME.fullmatch(node) is None:
            fail(escape(f"--node {node!r}: {NODE_NAME_RULE}"), code=2)
        return metrics_path(home, node)
    single = metrics_path(home)
    if single.exists():
        return single
    nodes = sorted(p.name[len("metrics-") : -len(".prom")] for p in home.glob("metrics-*.prom"))
    if len(nodes) == 1:
        return metrics_path(home, nodes[0])
    running = [n for n in nodes if _running(metrics_path(home, n))]
    if len(running) == 1:
        return metrics_path(home, running[0])
    if nodes:
        among = ", ".join(running or nodes)
        none_runs = "" if running else " (none of them runs)"
        fail(escape(f"several gateways write here{none_runs}; pass --node with one of: {among}"),
             code=2)
    return single


def _running(path: Path) -> bool:
    """Whether the gateway writing ``path`` still runs, as far as its file tells: it says up
    and was rewritten lately. A file that cannot be read may be anyone's: counted as running,
    so that it is offered rather than passed over; one gone meanwhile is no gateway's."""
    try:
        snapshot = read_metrics(path)
    except MetricsFileError as exc:
        return exc.reason is not MetricsFileReason.MISSING
    return snapshot.up and not _stale(snapshot, time.time() - snapshot.at.timestamp())


def _stale(snapshot: MetricsSnapshot, age: float) -> bool:
    return snapshot.up and age > STALE_SECONDS


def _as_json(snapshot: MetricsSnapshot, path: Path, age: float) -> dict[str, Any]:
    return {
        **snapshot.as_json(),
        "file": str(path),
        "age_seconds": round(age, 1),
        "up": snapshot.up,
        "stale": _stale(snapshot, age),
    }


def _print(snapshot: MetricsSnapshot, path: Path, age: float) -> None:
    when = snapshot.at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    header = Text.assemble(
        ("gateway ", "bold"), (snapshot.node, "bold"), f": counts of {when}, {_age(age)} ago"
    )
    console.print(header)
    if not snapshot.up:
        console.print("[yellow]the gateway stopped[/]: these are its last counts")
    elif _stale(snapshot, age):
        console.print(
            f"[yellow]not updated for {_age(age)}[/] (every {EXPORT_SECONDS:.0f} s while it "
            "runs): is the gateway running?"
        )
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("section")
    table.add_column("counter")
    table.add_column("count", justify="right")
    for section in SECTIONS:
        counts = snapshot.section(section)
        if not counts:
            table.add_row(section, Text("(nothing counted)", style="dim"), "")
        for index, (name, value) in enumerate(counts.items()):
            style = "yellow" if name.startswith(_ALARMING) else ""
            # Text, not markup: a counter's name may hold brackets
            table.add_row(
                section if index == 0 else "",
                Text(name, style=style),
                Text(_count(value), style=style),
            )
        table.add_section()
    console.print(table)
    console.print(Text(f"from {path}", style="dim"))


def _count(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"


def _age(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"
