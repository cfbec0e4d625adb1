"""`fleetgate bench ...`: benchmarks that print figures (ratios measured in one run)."""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli.common import JsonOption, console, print_json

app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


@app.command("pki")
def pki_command(
    count: Annotated[int, typer.Option(help="Certificates to issue in each variant.")] = 2000,
    as_json: JsonOption = False,
) -> None:
    """Issuances/s through pki (template, sign, validate) against bare builder signing."""
    from gateway.bench_pki import render_pki_bench, run_pki_bench

    result = run_pki_bench(count)
    if as_json:
        print_json(result)
    else:
        console.print(render_pki_bench(result))
