"""Curation commands: propose, proposals, export, versions, compare, verify (review: review_commands)."""

from __future__ import annotations

import shlex

import click

from .main import cli
from .output import at_least_one, emit, output_options
from ..errors import InfluenceStoreError
from .store_commands import confirm_stored_task, db_option, open_store, pairs

ID = click.IntRange(1, 2**63 - 1)  # what the store can hold: a larger id is a usage error, not an overflow

PROPOSAL_COLUMNS = ["id", "run_id", "rule", "rank", "key", "label", "status", "reviewer", "evidence", "outcome",
                    "new_label", "note"]


def _evidence_line(evidence: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in evidence.items())


def _proposal_rows(proposals: list[dict], fmt: str) -> list[dict]:
    if fmt != "table":  # JSON, and a JSON cell in CSV: every digit, machine-readable
        return proposals
    return [{**p, "evidence": _evidence_line(p["evidence"])} for p in proposals]


@cli.command()
@db_option
@click.argument("run_id", type=ID)
@click.option("--rule", default="harmful", show_default=True, help="Proposal rule (see `influence-store rules`).")
@click.option("--top", default=50, show_default=True, type=int, callback=at_least_one, help="How many proposals to create.")
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Rule option, repeatable.")
@click.option("--by", "actor", default=None, help="Who proposes (default: the OS user).")
@output_options
def propose(db, run_id, rule, top, options, actor, fmt):
    """Turn a run's stored scores into removal proposals with their evidence.

    Example: influence-store propose 1 --rule harmful --top 50
    """
    from ..curation import propose as make

    created = make(open_store(db, write=True), run_id, rule, top, pairs(options), actor)
    emit(_proposal_rows(created, fmt), fmt, PROPOSAL_COLUMNS)


@cli.group(invoke_without_command=True)
@output_options
@click.pass_context
def proposals(ctx, fmt):
    """List removal proposals (`proposals` = `proposals list`, with --json/--csv too), or show one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(proposals_list, as_json=fmt == "json", as_csv=fmt == "csv")


@proposals.command("list")
@db_option
@click.option("--status", default=None, type=click.Choice(["proposed", "accepted", "rejected", "applied"]),
              help="Only proposals in this review state.")
@click.option("--rule", default=None, help="Only proposals made by this rule (see `influence-store rules`).")
@click.option("--run", "run_id", default=None, type=ID, help="Only proposals made from this run.")
@click.option("--dataset", default=None, help="Only proposals for examples of this training dataset.")
@output_options
def proposals_list(db=None, status=None, rule=None, run_id=None, dataset=None, fmt="table"):
    """Proposals, filtered by status, rule, run or dataset."""
    found = open_store(db).proposals(status=status, rule=rule, run_id=run_id, dataset=dataset)
    emit(_proposal_rows(found, fmt), fmt, PROPOSAL_COLUMNS)


@proposals.command("show")
@db_option
@click.argument("proposal_id", type=ID)
@output_options
def proposals_show(db, proposal_id, fmt):
    """One proposal: example, evidence, and every review event."""
    store = open_store(db)
    found = store.proposals(ids=[proposal_id])
    if not found:
        raise click.ClickException(f"no proposal {proposal_id}; see `influence-store proposals list`")
    proposal = {**found[0], "events": store.proposal_events(proposal_id),
                "example": store.examples([found[0]["example_id"]])[found[0]["example_id"]]["payload"]}
    if fmt != "table":
        emit(proposal, fmt)
        return
    for key in ("id", "run_id", "rule", "rank", "key", "label", "status", "outcome", "new_label", "reviewer", "note"):
        click.echo(f"{key:>10}: {proposal[key]}")
    click.echo(f"{'evidence':>10}: {_evidence_line(proposal['evidence'])}")
    for event in proposal["events"]:
        relabel = f" (relabel to {event['new_label']!r})" if event.get("new_label") is not None else ""
        click.echo(f"  {event['time_utc']}  {event['from'] or '-'} -> {event['to']}{relabel}  by {event['actor']}"
                   + (f": {event['note']}" if event["note"] else ""))


@cli.command()
@db_option
@click.option("--dataset", required=True, help="Training dataset to export (see `influence-store runs list`).")
@click.option("--output", default=None, type=click.Path(dir_okay=False), help="JSON-lines file to write (required).")
@click.option("-o", "output_short", default=None, type=click.Path(dir_okay=False), hidden=True)  # old spelling
@click.option("--version", "version", required=True, help="Name of the new model version the removals apply to.")
@click.option("--parent", default=None, help="Parent version (default: the version of the newest run on the data).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--note", default=None, help="Why (recorded with the new version and each applied removal).")
@click.option("--by", "actor", default=None, help="Who exports (default: the OS user).")
@output_options
def export(db, dataset, output, output_short, version, parent, force, note, actor, fmt):
    """Write the training set minus accepted removals (plus a removals manifest) and mark them
    applied in a new model version.

    Example: influence-store export --dataset digits-noisy --output clean.jsonl --version v2
    """
    from ..curation import export as write

    output = output or output_short
    if not output:
        raise click.UsageError("Missing option '--output'.")
    result = write(open_store(db, write=True), dataset, output, version, parent, force, actor, note)
    if fmt == "table":
        click.echo(f"wrote {result['kept']} examples to {result['output']} ({result['removed_now']} removed now, "
                   f"{result['removed_before']} earlier; {result['relabelled_now']} relabelled now, "
                   f"{result['relabelled_before']} earlier; manifest {result['manifest']}); new version {version!r}")
        return
    emit(result, fmt)


@cli.group(invoke_without_command=True)
@output_options
@click.pass_context
def versions(ctx, fmt):
    """Model versions: register and list (`versions` = `versions list`, with --json/--csv too)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(versions_list, as_json=fmt == "json", as_csv=fmt == "csv")


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
    emit(open_store(db).versions(), fmt, ["id", "name", "parent", "dataset", "runs", "checkpoint_sha256", "created_utc"])


@cli.command()
@db_option
@click.argument("old")
@click.argument("new")
@click.option("--old-run", type=ID, default=None, help="Run of OLD to use (default: its newest finished run).")
@click.option("--new-run", type=ID, default=None, help="Run of NEW to use (default: its newest finished run).")
@click.option("--top", default=10, show_default=True, type=int, callback=at_least_one, help="How many rank movers to list.")
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


@cli.command()
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
    task_spec = confirm_stored_task(store.run(run_id), task_spec)
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
    click.echo(f"removed {result['n_removed']}{relabelled}: test loss {result['loss_before']:.6g} -> {result['loss_after']:.6g} "
               f"(actual {result['actual_loss_change']:+.6g}, predicted {result['predicted_loss_change']:+.6g}"
               f"{' for the removals' if result['n_relabelled'] else ''}){acc}")
