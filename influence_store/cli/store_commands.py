"""The store and the scores it holds: ``init``, ``db path|status|upgrade|downgrade|backup``, ``run`` (compute and
store every score), ``runs list|show`` and ``scores``."""

from __future__ import annotations

import json
import shlex

import click

from .. import collector
from .common import confirm_stored_task, db_option, open_store, pairs, stdin_is_terminal
from .output import listing_group, at_least_one, emit, output_options
from .run_options import options_given, setting_names, settings_options


@click.command()
@db_option
def init(db):
    """Create the store (or upgrade it to the newest schema).

    Example: influence-store init --db curation.db
    """
    store = open_store(db, create=True)
    click.echo(f"store ready: {store.location} (schema {store.revision()})")


@click.group()
def db():
    """Where the store is, what it holds, upgrade, downgrade and backup."""


@db.command("path")
@db_option
def db_path(db):
    """Print the store location that commands will use."""
    from ..store import default_location

    click.echo(db or default_location())


@db.command("status")
@db_option
@output_options
def db_status(db, fmt):
    """Schema revision and row counts."""
    from ..store import Store
    from ..store_file import check_ours

    status = Store(db, create=False, upgrade=False).status()  # any revision, if ours: it says which one
    check_ours(status["revision"], status["location"], set(status["rows"]))
    if fmt == "json":
        emit(status, fmt)
        return
    if fmt != "csv":  # CSV is the table alone, for a spreadsheet or a script
        click.echo(f"store: {status['location']}\nschema: {status['revision']} (head {status['head']})")
    emit([{"table": k, "rows": v} for k, v in status["rows"].items()], fmt, ["table", "rows"])


@db.command("upgrade")
@db_option
def db_upgrade(db):
    """Upgrade the store's schema to the newest revision (opening it does this too)."""
    store = open_store(db, write=True)
    click.echo(f"store {store.location} at schema {store.revision()}")


@db.command("downgrade")
@db_option
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask before dropping what newer revisions added.")
def db_downgrade(db, revision, yes):
    """Move the store's schema back to REVISION (e.g. to use an older influence-store); tables that
    REVISION lacks are dropped with their rows, so back the store up first.

    Example: influence-store db downgrade 0001
    """
    from ..store import Store

    store = Store(db, create=False, upgrade=False)
    if not yes:
        click.confirm(f"downgrade {store.location} from {store.revision()} to {revision}, dropping data that "
                      f"{revision} has no table for?", abort=True)
    store.downgrade(revision)
    click.echo(f"store {store.location} at schema {store.revision()}")


@db.command("backup")
@db_option
@click.argument("target")
def db_backup(db, target):
    """Copy a consistent snapshot of the store to TARGET (safe while a run writes)."""
    import sqlite3
    from pathlib import Path

    from ..files import check_output_path
    from ..store import Store
    from ..store_file import check_sqlite_file, sqlite_path

    path = sqlite_path(db)
    if path is not None:
        check_sqlite_file(path, db or str(path))
    store = Store(db, create=False, upgrade=False)  # any revision: a backup before an upgrade is the point
    if store.revision() is None:
        raise click.ClickException(f"{store.location!r} is not an influence-store database (no schema revision)")
    if store.is_sqlite:
        check_output_path(Path(target))
    try:
        store.backup(target)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot write backup {target!r}: {exc}; choose a writable folder") from None
    click.echo(f"backed up to {target}")


@click.command()
@db_option
@click.argument("task_spec")
@settings_options
@click.option("-t", "--task-option", "task_options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Task-loader option, repeatable (python tasks: keyword arguments of the function).")
@click.option("--train-data", default=None, help="Shortcut for -t train_data PATH.")
@click.option("--test-data", default=None, help="Shortcut for -t test_data PATH.")
@click.option("--model-version", default=None, help="Model version name (default: one derived from the weights).")
@click.option("--dataset", default=None, help="Name of the training dataset (default: the task's name).")
@click.option("--resume", "resume", type=int, default=None, metavar="RUN",
              help="Resume an interrupted run with its stored settings (setting options are refused); TASK_SPEC "
                   "must be the run's own task ('-' asks on a terminal before loading the task the store names).")
@click.option("--allow-removed", is_flag=True,
              help="Score training examples whose removal was applied in this model version's lineage.")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Split the run over N local Dask worker processes (needs influence-store[dask]).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Split the run over the workers of this Dask cluster (needs influence-store[dask]).")
@click.option("--lease", "lease_seconds", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, metavar="SECONDS",
              help="A block whose process stopped renewing its claim for this long is computed by another.")
@click.option("--quiet", is_flag=True, help="No progress bars (phase lines with elapsed times still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (and nothing else).")
@collector.paused_for_run()  # opening the store and importing the engine are part of loading the run
def run(db, task_spec, settings, task_options, train_data, test_data, model_version, dataset, resume, allow_removed,
        workers, scheduler, lease_seconds, quiet, as_json):
    """Compute every influence score of TASK_SPEC and store it.

    TASK_SPEC is FILE.py:FUNCTION, MODULE:FUNCTION, or LOADER:TARGET (e.g. allennlp:model.tar.gz).
    Running the same settings again reports the stored run; an interrupted run resumes. Processes
    started with the same settings (by hand, by SLURM, or --workers) share the run, block by block.

    Example: influence-store run examples/digits_noisy.py:task -a exact -o damping 0.001
    """
    from ..phases import Phases
    from ..runs import execute_run
    from ..trust import UntrustedTaskError

    if resume is not None:  # a resumed run computes with its stored settings: one given here would be ignored
        given = options_given(click.get_current_context(), setting_names() | {"model_version", "dataset"})
        if given:
            raise click.ClickException(f"--resume {resume} computes with the run's stored settings; leave out "
                                       f"{', '.join(given)} (or start a new run without --resume)")
    store = open_store(db, create=True)
    task_opts = pairs(task_options)
    if train_data:
        task_opts["train_data"] = train_data
    if test_data:
        task_opts["test_data"] = test_data
    if resume is not None and task_spec == "-" and store.run(resume)["status"] != "done":
        task_spec = confirm_stored_task(store.run(resume), task_spec, stdin_is_terminal())
    try:
        result = execute_run(store, task_spec, settings, task_options=task_opts, model_version=model_version,
                             dataset=dataset, progress=not quiet and not as_json, resume=resume,
                             allow_removed=allow_removed, lease_seconds=lease_seconds, workers=workers,
                             scheduler=scheduler, phases=Phases(enabled=not as_json))
    except UntrustedTaskError as exc:
        raise click.ClickException(f"{exc}: influence-store run {shlex.quote(exc.spec)} --resume {exc.run_id}") \
            from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the chunks already stored are kept: the same command resumes "
                                   "the run") from None
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    words = {"computed": "stored", "resumed": "resumed and stored", "existing": "already stored (same settings):"}
    click.echo(f"run {result.run_id} {words[result.outcome]} in {store.location}")


runs = listing_group("runs", "List runs (`runs` = `runs list`, with --json/--csv too), or show one.")


RUN_COLUMNS = ["id", "status", "model_version", "approximator", "freeze", "n_train", "n_test", "chunks_done",
               "chunks_total", "effective_damping", "seconds_total", "created_utc"]


@runs.command("list")
@db_option
@click.option("--version", "version", default=None, help="Only runs of this model version.")
@click.option("--status", default=None, help="Only runs with this status (pending, running, done, failed, ...).")
@output_options
def runs_list(db=None, version=None, status=None, fmt="table"):
    """All runs with their status and settings."""
    from ..store_file import list_runs, sqlite_path

    if sqlite_path(db) is not None:  # plain sqlite3: a listing should start as fast as --help
        found = list_runs(db, version=version, status=status)
    else:
        found = open_store(db).runs(version=version, status=status)
    emit(found, fmt, RUN_COLUMNS)


@runs.command("show")
@db_option
@click.argument("run_id")
@output_options
def runs_show(db, run_id, fmt):
    """One run: provenance, settings, diagnostics."""
    info = open_store(db).run(run_id)
    if fmt != "table":
        emit(info, fmt)
        return
    for key, value in info.items():
        if isinstance(value, (dict, list)):  # settings, diagnostics, options, ...: JSON, as --json prints them
            value = json.dumps(value, default=str)[:400]
        click.echo(f"{key:>20}: {value}")


@click.command()
@db_option
@click.argument("run_id")
@click.option("--test", "test_key", default=None, help="Key of one test example (default: aggregate over all).")
@click.option("--top", default=10, show_default=True, type=int, callback=at_least_one,
              help="How many training examples per group.")
@click.option("--rank-by", "rank_by", default=None, type=click.Choice(["sum", "mean"]),
              help="Aggregate used to rank when no --test is given [default: sum].")
@click.option("--by", "by", default=None, type=click.Choice(["sum", "mean"]), hidden=True)  # old name of --rank-by
@click.option("--partial", is_flag=True, help="Read an unfinished run (its scores cover only the chunks stored).")
@output_options
def scores(db, run_id, test_key, top, rank_by, by, partial, fmt):
    """Most helpful and most harmful training examples, for one test example or over the test set.

    Scores: positive = helpful (removing it would raise the test loss), negative = harmful.

    Example: influence-store scores 1 --test digit-18 --top 5 --json
    """
    store = open_store(db)
    check_finished(store.run(run_id), partial)  # also a clear error for an unknown run
    if test_key is not None:
        result = store.top_scores(int(run_id), test_key, top)
        columns = ["key", "label", "score", "loss"]
    else:
        result = store.top_aggregate(int(run_id), top, by=rank_by or by or "sum")
        columns = ["key", "label", "sum", "mean", "hurts", "loss", "self_influence"]
    if fmt == "json":
        emit({"run_id": int(run_id), "test": test_key, **result}, fmt)
        return
    if fmt == "csv":  # one table: a group column instead of a second header
        emit([{"group": name, **r} for name in ("harmful", "helpful") for r in result[name]], fmt, ["group"] + columns)
        return
    for name in ("harmful", "helpful"):
        click.echo(f"most {name}:")
        emit(result[name], fmt, columns)


def check_finished(run: dict, partial: bool) -> None:
    """Reading an unfinished run needs --partial, and then says how much of it there is."""
    if run["status"] == "done":
        return
    what = (f"run {run['id']} is {run['status']}, with {run['chunks_done']} of {run['chunks_total']} test chunks "
            f"stored")
    if not partial:
        raise click.ClickException(f"{what}; finish it (influence-store run TASK --resume {run['id']}) or pass "
                                   f"--partial to read the stored part")
    click.echo(f"warning: {what}; results cover only that part of the test set", err=True)
