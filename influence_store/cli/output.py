"""One way to print rows: a table by default, ``--json`` or ``--csv`` for scripts."""

from __future__ import annotations

import csv
import functools
import json
import sys
from typing import Any, Iterable

import click

from .common import db_option


def output_options(command):
    """Add ``--json`` and ``--csv`` to a command; it receives ``fmt`` ('table', 'json' or 'csv')."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
    @functools.wraps(command)
    def wrapper(*args, as_json: bool, as_csv: bool, **kwargs):
        if as_json and as_csv:
            raise click.UsageError("choose one of --json and --csv")
        return command(*args, fmt="json" if as_json else "csv" if as_csv else "table", **kwargs)

    return wrapper


def listing_group(name: str, help: str) -> click.Group:
    """A noun's group that lists when called alone (``runs`` = ``runs list``, with --db, --json, --csv too);
    its ``list`` subcommand is added to it like any other."""

    @click.group(name, invoke_without_command=True, help=help)
    @db_option
    @output_options
    @click.pass_context
    def group(ctx, db, fmt):
        if ctx.invoked_subcommand is None:
            ctx.invoke(group.commands["list"], db=db, as_json=fmt == "json", as_csv=fmt == "csv")

    return group


def at_least_one(ctx, param, value):
    """``--top`` and friends: the same one-line error (exit 1) in every command."""
    if value is not None and value < 1:
        raise click.ClickException(f"--{param.name} must be at least 1, got {value}")
    return value


def emit(rows: Any, fmt: str, columns: list[str] | None = None) -> None:
    """Print a list of dicts (or one dict) in the chosen format."""
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    records = [rows] if isinstance(rows, dict) else list(rows)
    columns = columns or (list(records[0]) if records else [])
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in records:
            writer.writerow({c: _cell(row.get(c), exact=True) for c in columns})
        return
    click.echo(table(records, columns))


def table(records: Iterable[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    rows = [[_cell(r.get(c)) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(columns), line(["-" * w for w in widths])] + [line(row) for row in rows]
    return "\n".join(out) if rows else line(columns) + "\n(none)"


def _cell(value: Any, exact: bool = False) -> str:
    """Tables round floats to 6 digits for reading; CSV keeps every digit (``repr`` round-trips)."""
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)
