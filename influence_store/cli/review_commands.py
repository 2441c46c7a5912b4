"""Review commands: ``review accept|reject|revert|relabel|import`` and ``examples show``."""

from __future__ import annotations

import click

from .curation_commands import ID, PROPOSAL_COLUMNS, _proposal_rows
from .main import cli
from .output import emit, output_options
from .store_commands import db_option, open_store


@cli.group()
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


@cli.group()
def examples():
    """Stored examples: see what a curator is asked to judge."""


@examples.command("show")
@db_option
@click.argument("key")
@click.option("--dataset", default=None, help="Dataset of the key (needed when several hold it).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the rendering: an image to FILE.png, text to any other file.")
@click.option("--with-task", is_flag=True, help="Render with the task's own render(example): loads the run's task "
                                                "(which may train its model) instead of reading the stored payload.")
@output_options
def examples_show(db, key, dataset, output, with_task, fmt):
    """Show one example as its task renders it, with its label and where it was scored.

    Example: influence-store examples show digit-1337 -o digit.png
    """
    from ..render import StoredRenderer, write_rendering

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
        click.echo(f"wrote {write_rendering(rendering, output)}", err=fmt != "table")
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
        click.echo(f"  run {h['run_id']} ({h['model_version']}, {h['split']} #{h['position']}): loss {h['loss']:.4g}{si}")
