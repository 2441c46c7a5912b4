"""report (HTML page of a run) and demo (the whole loop on the bundled example)."""

from __future__ import annotations

import json

import click

from .main import cli
from .output import at_least_one
from .store_commands import db_option, open_store

DEMO_TASK = "influence_store.examples.digits_noisy:task"


@cli.command()
@db_option
@click.argument("run_id", type=click.IntRange(1, 2**63 - 1))
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="HTML file to write [default: influence-store-report.html].")
@click.option("-o", "output_short", default=None, type=click.Path(dir_okay=False), hidden=True)  # old spelling
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--top", default=10, show_default=True, type=int, callback=at_least_one,
              help="Training examples per table.")
def report(db, run_id, output, output_short, force, top):
    """Write a self-contained HTML report of a run (plots embedded).

    Example: influence-store report 1 --output report.html
    """
    from ..report import write_report

    path = output or output_short or "influence-store-report.html"
    click.echo(f"wrote {write_report(open_store(db), run_id, path, top, force=force)}")


@cli.command()
@db_option
@click.option("--report", "report_path", default="influence-store-report.html", show_default=True,
              help="HTML report to write (replaced if it exists: the demo owns it).")
@click.option("--top", default=20, show_default=True, type=int, callback=at_least_one, help="Proposals per rule.")
@click.option("--quiet", is_flag=True, help="No progress bars (phase lines with elapsed times still go to stderr).")
@click.pass_context
def demo(ctx, db, report_path, top, quiet):
    """The whole loop on the bundled noisy-digits example: run, propose, show, report.

    It chains the real commands; README shows the same steps one by one.
    """
    from . import curation_commands, store_commands

    store = open_store(db, create=True)
    click.echo(f"$ influence-store run {DEMO_TASK} -a exact")
    ctx.invoke(store_commands.run, db=db, task_spec=DEMO_TASK, approximator="exact", quiet=quiet)
    run_id = max(r["id"] for r in store.runs(status="done") if r["task_spec"] == DEMO_TASK)
    for rule in ("self-influence", "harmful"):
        click.echo(f"\n$ influence-store propose {run_id} --rule {rule} --top {top}")
        ctx.invoke(curation_commands.propose, db=db, run_id=run_id, rule=rule, top=top)
    proposals = store.proposals(run_id=run_id)
    examples = store.examples(p["example_id"] for p in proposals)
    flipped = [p for p in proposals
               if examples[p["example_id"]]["payload"].get("original_label") != p["label"]]
    click.echo(f"\n{len(flipped)} of {len(proposals)} proposals are training examples whose label was flipped "
               f"(10% of the training labels were flipped)")
    click.echo(f"\n$ influence-store report {run_id} --output {report_path} --force")
    ctx.invoke(report, db=db, run_id=run_id, output=report_path, force=True)
    click.echo(json.dumps({"run_id": run_id, "proposals": len(proposals), "flipped": len(flipped),
                           "report": report_path, "store": store.location}))
