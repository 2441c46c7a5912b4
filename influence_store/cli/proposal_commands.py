"""A proposal's life: ``propose`` (from a run's scores), ``proposals list|show``, ``review
accept|reject|revert|relabel|import``, ``examples show`` (what a reviewer judges), and ``export`` (the training
set without the accepted removals, in a new model version)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import ID, db_option, open_store, pairs
from .output import listing_group, at_least_one, emit, output_options

PROPOSAL_COLUMNS = ["id", "run_id", "rule", "rank", "key", "label", "status", "reviewer", "evidence", "outcome",
                    "new_label", "note"]


def _proposal_rows(proposals: list[dict], fmt: str) -> list[dict]:
    if fmt != "table":  # JSON, and a JSON cell in CSV: every digit, machine-readable
        return proposals
    from ..report import evidence_text

    return [{**p, "evidence": evidence_text(p["evidence"])} for p in proposals]


@click.command()
@db_option
@click.argument("run_id", type=ID)
@click.option("--rule", default="harmful", show_default=True, help="Proposal rule (see `influence-store rules`).")
@click.option("--top", default=50, show_default=True, type=int, callback=at_least_one,
              help="How many proposals to create.")
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


proposals = listing_group("proposals", "List removal proposals (`proposals` = `proposals list`, with --json/--csv "
                                        "too), or show one.")


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
    from ..report import evidence_text

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
        click.echo(f"{key:>10}: {'-' if proposal[key] is None else proposal[key]}")
    click.echo(f"{'evidence':>10}: {evidence_text(proposal['evidence'])}")
    for event in proposal["events"]:
        relabel = f" (relabel to {event['new_label']!r})" if event.get("new_label") is not None else ""
        click.echo(f"  {event['time_utc']}  {event['from'] or '-'} -> {event['to']}{relabel}  by {event['actor']}"
                   + (f": {event['note']}" if event["note"] else ""))


@click.group()
def review():
    """Decide on proposals: accept (remove), relabel, reject, revert; or import decisions from a CSV file.

    Example: influence-store review accept 3 4 7 --note "label is wrong"
    """


def _decision_command(action: str, summary: str):
    @review.command(action, help=summary)
    @db_option
    @click.argument("ids", nargs=-1, type=ID, required=True)
    @click.option("--note", default=None, help="Why (recorded with the decision).")
    @click.option("--by", "actor", default=None, help="Reviewer (default: $INFLUENCE_STORE_USER or the OS user).")
    @output_options
    def command(db, ids, note, actor, fmt):
        from ..curation import review as decide

        changed = decide(open_store(db, write=True), action, ids, note, actor)
        emit(_proposal_rows(changed, fmt), fmt, PROPOSAL_COLUMNS)

    return command


_decision_command("accept", "Accept proposals as removals; all or none change.")
_decision_command("reject", "Reject proposals (the example stays as it is); all or none change.")
_decision_command("revert", "Send decided proposals back to proposed; all or none change.")


@review.command("relabel")
@db_option
@click.argument("ids", nargs=-1, type=ID, required=True)
@click.option("--label", "new_label", required=True, help="The corrected label (read as the current label's type).")
@click.option("--note", default=None, help="Why (recorded with the decision).")
@click.option("--by", "actor", default=None, help="Reviewer (default: $INFLUENCE_STORE_USER or the OS user).")
@output_options
def review_relabel(db, ids, new_label, note, actor, fmt):
    """Accept proposals as relabels: export keeps the example with the new label.

    Example: influence-store review relabel 12 --label 7 --note "clearly a seven"
    """
    from ..curation import review as decide

    changed = decide(open_store(db, write=True), "relabel", ids, note, actor, new_label=new_label)
    emit(_proposal_rows(changed, fmt), fmt, PROPOSAL_COLUMNS)


@review.command("import")
@db_option
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--by", "actor", default=None, help="Reviewer (default: $INFLUENCE_STORE_USER or the OS user).")
@output_options
def review_import(db, path, actor, fmt):
    """Store the decisions of a CSV file (columns: id or key, decision or status, new_label, note);
    `proposals list --csv` writes one. Every row is checked first; all or none are stored.

    Example: influence-store review import decisions.csv --by ann
    """
    from ..decisions import import_decisions

    result = import_decisions(open_store(db, write=True), path, actor)
    if fmt == "table":
        click.echo(f"{result['changed']} proposals changed"
                   + (f": {', '.join(map(str, result['proposal_ids']))}" if result["proposal_ids"] else ""))
        return
    emit(result, fmt)


@click.group()
def examples():
    """Stored examples: see what a curator is asked to judge."""


@examples.command("show")
@db_option
@click.argument("key")
@click.option("--dataset", default=None, help="Dataset of the key (needed when several hold it).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the rendering: an image to FILE.png, text to any other file.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--with-task", is_flag=True, help="Render with the task's own render(example): loads the run's task "
                                                "(which may train its model) instead of reading the stored payload.")
@output_options
def examples_show(db, key, dataset, output, force, with_task, fmt):
    """Show one example as its task renders it, with its label and where it was scored.

    Example: influence-store examples show digit-1337 -o digit.png
    """
    from ..files import check_output_path
    from ..render import StoredRenderer, write_rendering

    if output:
        check_output_path(Path(output))
        if Path(output).exists() and not force:
            raise click.ClickException(f"{output!r} exists; pass --force to overwrite it")
    store = open_store(db)
    found = store.examples_by_key(key, dataset)
    if not found:
        raise click.ClickException(f"no example with key {key!r}" + (f" in dataset {dataset!r}" if dataset else "")
                                   + "; keys are listed by `influence-store proposals list`")
    datasets = sorted({e["dataset"] for e in found})
    if len(datasets) > 1:
        raise click.ClickException(f"key {key!r} is in datasets {', '.join(datasets)}; choose one with --dataset")
    example = found[0]  # newest content of this key
    history = store.example_history([e["id"] for e in found])
    runs = [h for h in history if h["example_id"] == example["id"]]
    rendering = StoredRenderer(use_task=with_task).render(example, store.run(runs[-1]["run_id"]) if runs else None)
    if output:
        try:
            click.echo(f"wrote {write_rendering(rendering, output)}", err=fmt != "table")
        except OSError as exc:
            raise click.ClickException(f"cannot write {output!r}: {exc.strerror or exc}; choose a writable folder") \
                from None
    info = {"key": example["key"], "dataset": example["dataset"], "label": example["label"],
            "text": rendering.text, "fields": rendering.fields, "image": rendering.png is not None,
            "history": history}
    if fmt != "table":
        emit(info if fmt == "json" else history, fmt)
        return
    click.echo(f"{example['key']} ({example['dataset']}), label {example['label']!r}")
    if not output or rendering.png is None:
        click.echo(rendering.as_text())
    for h in history:
        si = f", self-influence {h['self_influence']:.4g}" if h["self_influence"] is not None else ""
        where = f"run {h['run_id']} ({h['model_version']}, {h['split']} #{h['position']})"
        click.echo(f"  {where}: loss {h['loss']:.4g}{si}")


@click.command()
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
