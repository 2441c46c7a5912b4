"""``plugins``, ``approximators``, ``policies``, ``loaders``, ``rules``: what is registered, with options and help
text."""

from __future__ import annotations

import click

from ..options import describe_options
from ..plugin_manager import plugin_summaries, registry
from .output import emit, output_options


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
@output_options
def plugins(show_all, fmt):
    """List installed plugins: name, version, hooks.

    Example: influence-store plugins --all --json
    """
    rows = plugin_summaries(include_builtins=show_all)
    if fmt != "json":
        rows = [{**row, "hooks": ", ".join(row["hooks"])} for row in rows]
    emit(rows, fmt, ["name", "package", "version", "hooks"])


def _implementations(hook: str, with_options: bool, fmt: str, flag: str) -> None:
    """Rows of one registry; ``flag`` is the option that passes these options (-o, -f or -t)."""
    rows = []
    for name, entry in sorted(registry(hook).items()):
        row = {"name": name, "plugin": entry.plugin, "summary": entry.summary}
        if with_options or fmt == "json":
            row["options"] = [vars(info) for info in describe_options(entry.options_cls)]
        rows.append(row)
    if fmt == "table" and with_options:
        for row in rows:
            click.echo(f"{row['name']}  ({row['plugin']})\n  {row['summary']}")
            for o in row["options"]:
                click.echo(f"  {flag} {o['name']} ({o['type']}, default {o['default']!r}): {o['help']}")
        return
    emit(rows, fmt, ["name", "plugin", "summary"])


@click.command()
@click.option("--options", "with_options", is_flag=True, help="Show each option with its default and help.")
@output_options
def approximators(with_options, fmt):
    """List inverse-HVP approximators.

    Example: influence-store approximators --options
    """
    _implementations("register_approximators", with_options, fmt, "-o")


@click.command()
@click.option("--options", "with_options", is_flag=True, help="Show each option with its default and help.")
@output_options
def policies(with_options, fmt):
    """List parameter-freezing policies.

    Example: influence-store policies --options
    """
    _implementations("register_freezing_policies", with_options, fmt, "-f")


@click.command()
@click.option("--options", "with_options", is_flag=True, help="Show each loader's -t options.")
@output_options
def loaders(with_options, fmt):
    """List task loaders (the LOADER: prefix of a task spec) and their -t options.

    Example: influence-store loaders --options
    """
    _implementations("register_task_loaders", with_options, fmt, "-t")


@click.command()
@output_options
def rules(fmt):
    """List removal-proposal rules (`propose --rule NAME`) with their -o options.

    Example: influence-store rules
    """
    _implementations("register_proposal_rules", True, fmt, "-o")
