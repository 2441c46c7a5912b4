"""``demo``: the whole loop on the bundled noisy-digits example, by invoking the registered commands."""

from __future__ import annotations

import json

import click

from .common import db_option, open_store
from .output import at_least_one

DEMO_TASK = "influence_store.examples.digits_noisy:task"


@click.command()
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
    commands = ctx.find_root().command.commands  # as registered: the demo types what a user would
    store = open_store(db, create=True)
    click.echo(f"$ influence-store run {DEMO_TASK} -a exact")
    ctx.invoke(commands["run"], db=db, task_spec=DEMO_TASK, approximator="exact", quiet=quiet)
    run_id = max(r["id"] for r in store.runs(status="done") if r["task_spec"] == DEMO_TASK)
    for rule in ("self-influence", "harmful"):
        click.echo(f"\n$ influence-store propose {run_id} --rule {rule} --top {top}")
        ctx.invoke(commands["propose"], db=db, run_id=run_id, rule=rule, top=top)
    proposals = store.proposals(run_id=run_id)
    examples = store.examples(p["example_id"] for p in proposals)
    flipped = [p for p in proposals
               if examples[p["example_id"]]["payload"].get("original_label") != p["label"]]
    click.echo(f"\n{len(flipped)} of {len(proposals)} proposals are training examples whose label was flipped "
               f"(10% of the training labels were flipped)")
    click.echo(f"\n$ influence-store report {run_id} --output {report_path} --force")
    ctx.invoke(commands["report"], db=db, run_id=run_id, output=report_path, force=True)
    click.echo(json.dumps({"run_id": run_id, "proposals": len(proposals), "flipped": len(flipped),
                           "report": report_path, "store": store.location}))
