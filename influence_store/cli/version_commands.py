"""Model versions and what a curation changed: ``versions add|list``, ``compare`` (two versions), ``verify``
(retrain without the removals) and ``report`` (a run as one HTML page)."""

from __future__ import annotations

import shlex

import click

from ..errors import InfluenceStoreError
from .common import ID, confirm_stored_task, db_option, open_store, pairs, stdin_is_terminal
from .output import listing_group, at_least_one, emit, output_options


versions = listing_group("versions", "Model versions: register and list (`versions` = `versions list`, with "
                                      "--json/--csv too).")


@versions.command("add")
@db_option
@click.argument("name")
@click.option("--parent", default=None, help="The version this one was derived from (see `versions list`).")
@click.option("--checkpoint", default=None, type=click.Path(), help="Model file; its sha256 is recorded.")
@click.option("--dataset", default=None, help="Training dataset of this version.")
@click.option("--note", default=None, help="Free text kept with the version.")
@click.option("--notes", "old_notes", default=None, hidden=True)  # old spelling of --note
@output_options
def versions_add(db, name, parent, checkpoint, dataset, note, old_notes, fmt):
    """Register a model version (a version created by `export` gets its checkpoint here)."""
    from ..curation import add_version

    emit(add_version(open_store(db, create=True), name, parent, checkpoint, dataset, note or old_notes), fmt,
         ["id", "name", "parent", "checkpoint_sha256", "dataset", "created_utc"])


@versions.command("list")
@db_option
@output_options
def versions_list(db=None, fmt="table"):
    """Every model version with its parent, checkpoint hash and number of runs."""
    columns = ["id", "name", "parent", "dataset", "runs", "checkpoint_sha256", "created_utc"]
    emit(open_store(db).versions(), fmt, columns)


@click.command()
@db_option
@click.argument("old")
@click.argument("new")
@click.option("--old-run", type=ID, default=None, help="Run of OLD to use (default: its newest finished run).")
@click.option("--new-run", type=ID, default=None,
              help="Run of NEW to use (default: its newest finished run with OLD's settings, else its newest).")
@click.option("--top", default=10, show_default=True, type=int, callback=at_least_one,
              help="How many rank movers to list.")
@click.option("--allow-different-settings", is_flag=True,
              help="Compare runs made with different approximators, options, freezing or dtype (listed in the output).")
@output_options
def compare(db, old, new, old_run, new_run, top, allow_different_settings, fmt):
    """Compare two model versions: rank movement, applied removals, predicted vs actual test-loss change.

    Example: influence-store compare v1 v2 --json
    """
    from ..curation import compare as diff

    try:
        result = diff(open_store(db), old, new, old_run, new_run, top, allow_different_settings)
    except InfluenceStoreError as exc:
        if "not comparable" in str(exc):
            raise click.ClickException(f"{exc}, or pass --allow-different-settings") from None
        raise
    if fmt != "table":
        emit(result if fmt == "json" else result["movers"], fmt)
        return
    click.echo(f"{old} (run {result['old_run']}, {result['n_train_old']} train) -> {new} (run {result['new_run']}, "
               f"{result['n_train_new']} train); {result['n_common_train']} training examples in both")
    for line in result["settings_differ"]:
        click.echo(f"warning: the runs differ in {line}", err=True)
    click.echo(f"removals applied in {new}: {len(result['removed'])}; relabels: {len(result['relabelled'])}")
    click.echo(f"mean test loss: {result['test_loss_old']:.6g} -> {result['test_loss_new']:.6g} "
               f"(actual change {result['actual_loss_change']:+.6g}, predicted by {old}'s scores "
               f"{result['predicted_loss_change']:+.6g})")
    click.echo("largest rank changes (rank 1 = most harmful):")
    emit(result["movers"], fmt, ["key", "rank_old", "rank_new", "rank_change", "score_old", "score_new"])


@click.command()
@db_option
@click.argument("run_id", type=ID)
@click.argument("proposal_ids", nargs=-1, type=ID)
@click.option("--task", "task_spec", default=None, metavar="SPEC",
              help="The run's own task spec: its code is loaded only when named here (or confirmed on a terminal).")
@click.option("-t", "--task-option", "task_options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Task-loader option, repeatable; when given, must be the run's own.")
@output_options
def verify(db, run_id, proposal_ids, task_spec, task_options, fmt):
    """Retrain without the run's accepted removals (or the given proposals) and store predicted vs
    actual change of the test loss. Needs a task with fit(examples).

    Example: influence-store verify 1 --task influence_store.examples.digits_noisy:task
    """
    from ..curation import verify as check
    from ..phases import Phases
    from ..trust import UntrustedTaskError

    store = open_store(db, write=True)
    task_spec = confirm_stored_task(store.run(run_id), task_spec, stdin_is_terminal())
    try:
        result = check(store, run_id, list(proposal_ids) or None, task_spec=task_spec,
                       task_options=pairs(task_options), phases=Phases(enabled=fmt == "table"))
    except UntrustedTaskError as exc:
        raise click.ClickException(f"{exc}: influence-store verify {run_id} --task {shlex.quote(exc.spec)}") from None
    if fmt != "table":
        emit(result, fmt)
        return
    acc = ""
    if result["accuracy_before"] is not None:
        acc = f"; accuracy {result['accuracy_before']:.4f} -> {result['accuracy_after']:.4f}"
    relabelled = f", relabelled {result['n_relabelled']}" if result["n_relabelled"] else ""
    loss = f"test loss {result['loss_before']:.6g} -> {result['loss_after']:.6g}"
    click.echo(f"removed {result['n_removed']}{relabelled}: {loss} "
               f"(actual {result['actual_loss_change']:+.6g}, predicted {result['predicted_loss_change']:+.6g}"
               f"{' for the removals' if result['n_relabelled'] else ''}){acc}")


@click.command()
@db_option
@click.argument("run_id", type=ID)
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
