"""Store and run commands: init, db, run, runs, scores."""

from __future__ import annotations

import functools
import json

import click

from .main import cli
from .output import emit, output_options


def db_option(command):
    """``--db PATH|URL`` on a command (overrides the root ``--db``, $INFLUENCE_STORE_DB, ./influence-store.db)."""

    @click.option("--db", "db", default=None, metavar="PATH|URL",
                  help="Store location (default: $INFLUENCE_STORE_DB or ./influence-store.db).")
    @functools.wraps(command)
    def wrapper(*args, db, **kwargs):
        return command(*args, db=db or (click.get_current_context().find_root().params.get("db")), **kwargs)

    return wrapper


def open_store(db, **kwargs):
    from ..store import Store

    return Store(db, **kwargs)


def pairs(values) -> dict:
    """``-o KEY VALUE`` pairs -> dict; a repeated key collects its values in a list (``-f patterns a -f patterns b``)."""
    out: dict = {}
    for key, value in values:
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


@cli.command()
@db_option
def init(db):
    """Create the store (or upgrade it to the newest schema).

    Example: influence-store init --db curation.db
    """
    store = open_store(db)
    click.echo(f"store ready: {store.location} (schema {store.revision()})")


@cli.group()
def db():
    """Where the store is, what it holds, upgrade and backup."""


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
    status = open_store(db, create=False, upgrade=False).status()
    if fmt == "json":
        emit(status, fmt)
        return
    click.echo(f"store: {status['location']}\nschema: {status['revision']} (head {status['head']})")
    emit([{"table": k, "rows": v} for k, v in status["rows"].items()], fmt, ["table", "rows"])


@db.command("upgrade")
@db_option
def db_upgrade(db):
    """Upgrade the store's schema to the newest revision (opening it does this too)."""
    store = open_store(db, create=False)
    click.echo(f"store {store.location} at schema {store.revision()}")


@db.command("backup")
@db_option
@click.argument("target")
def db_backup(db, target):
    """Copy a consistent snapshot of the store to TARGET (safe while a run writes)."""
    open_store(db, create=False).backup(target)
    click.echo(f"backed up to {target}")


@cli.command()
@db_option
@click.argument("task_spec")
@click.option("-a", "--approximator", default="lissa", show_default=True,
              help="Inverse-HVP approximator (see `influence-store approximators --options`).")
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Approximator option, repeatable: -o damping 0.01.")
@click.option("--freeze", default="all", show_default=True, help="Freezing policy (see `influence-store policies`).")
@click.option("-f", "--freeze-option", "freeze_options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Freezing-policy option, repeatable: -f patterns 'encoder.*'.")
@click.option("-t", "--task-option", "task_options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Task-loader option, repeatable (python tasks: keyword arguments of the function).")
@click.option("--train-data", default=None, help="Shortcut for -t train_data PATH.")
@click.option("--test-data", default=None, help="Shortcut for -t test_data PATH.")
@click.option("--model-version", default=None, help="Model version name (default: one derived from the weights).")
@click.option("--dataset", default=None, help="Name of the training dataset (default: the task's name).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", default=None, type=click.Choice(["float32", "float64"]),
              help="Compute dtype (default: the model's).")
@click.option("--memory-budget-mb", default=256.0, show_default=True, type=float,
              help="Memory for per-example gradients and cached training gradients.")
@click.option("--test-chunk-size", default=None, type=int, help="Test examples per stored chunk.")
@click.option("--no-self-influence", is_flag=True,
              help="Skip self-influence of training examples (it costs one inverse-HVP per training example).")
@click.option("--model-mode", default="eval", show_default=True, type=click.Choice(["eval", "train"]),
              help="Mode for training-example gradients: train keeps dropout on, as AllenNLP's SimpleInfluence "
                   "(seeded by --seed, so runs repeat).")
@click.option("--resume", "resume", type=int, default=None, metavar="RUN",
              help="Resume an interrupted run with its stored settings (TASK_SPEC is then ignored; pass '-').")
@click.option("--allow-removed", is_flag=True,
              help="Score training examples whose removal was applied in this model version's lineage.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(db, task_spec, approximator, options, freeze, freeze_options, task_options, train_data, test_data,
        model_version, dataset, device, seed, dtype, memory_budget_mb, test_chunk_size, no_self_influence,
        model_mode, resume, allow_removed, quiet, as_json):
    """Compute every influence score of TASK_SPEC and store it.

    TASK_SPEC is FILE.py:FUNCTION, MODULE:FUNCTION, or LOADER:TARGET (e.g. allennlp:model.tar.gz).
    Running the same settings again reports the stored run; an interrupted run resumes.

    Example: influence-store run examples/digits_noisy.py:task -a exact -o damping 0.001
    """
    from ..runs import execute_run

    store = open_store(db)
    task_opts = pairs(task_options)
    if train_data:
        task_opts["train_data"] = train_data
    if test_data:
        task_opts["test_data"] = test_data
    result = execute_run(store, task_spec, task_options=task_opts, approximator=approximator,
                         options=pairs(options), freeze=freeze, freeze_options=pairs(freeze_options),
                         model_version=model_version, dataset=dataset, device=device, seed=seed, dtype=dtype,
                         memory_budget_mb=memory_budget_mb, test_chunk_size=test_chunk_size,
                         self_influence=not no_self_influence, progress=not quiet and not as_json, resume=resume,
                         allow_removed=allow_removed, model_mode=model_mode)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    words = {"computed": "stored", "resumed": "resumed and stored", "existing": "already stored (same settings):"}
    click.echo(f"run {result.run_id} {words[result.outcome]} in {store.location}")


@cli.group(invoke_without_command=True)
@click.pass_context
def runs(ctx):
    """List runs, or show one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(runs_list)


RUN_COLUMNS = ["id", "status", "model_version", "approximator", "freeze", "n_train", "n_test", "chunks_done",
               "chunks_total", "effective_damping", "seconds_total", "created_utc"]


@runs.command("list")
@db_option
@click.option("--version", "version", default=None, help="Only runs of this model version.")
@click.option("--status", default=None, type=click.Choice(["pending", "running", "done", "failed"]))
@output_options
def runs_list(db=None, version=None, status=None, fmt="table"):
    """All runs with their status and settings."""
    emit(open_store(db).runs(version=version, status=status), fmt, RUN_COLUMNS)


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
        if key in ("settings", "diagnostics"):
            value = json.dumps(value, default=str)[:400]
        click.echo(f"{key:>20}: {value}")


@cli.command()
@db_option
@click.argument("run_id")
@click.option("--test", "test_key", default=None, help="Key of one test example (default: aggregate over all).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--by", default="sum", type=click.Choice(["sum", "mean"]), show_default=True,
              help="Aggregate used to rank when no --test is given.")
@output_options
def scores(db, run_id, test_key, top, by, fmt):
    """Most helpful and most harmful training examples, for one test example or over the test set.

    Scores: positive = helpful (removing it would raise the test loss), negative = harmful.

    Example: influence-store scores 1 --test digit-17 --top 5 --json
    """
    store = open_store(db)
    store.run(run_id)  # clear error for an unknown run
    if test_key is not None:
        result = store.top_scores(int(run_id), test_key, top)
        columns = ["key", "label", "score", "loss"]
    else:
        result = store.top_aggregate(int(run_id), top, by=by)
        columns = ["key", "label", "sum", "mean", "hurts", "loss", "self_influence"]
    if fmt == "json":
        emit({"run_id": int(run_id), "test": test_key, **result}, fmt)
        return
    for name in ("harmful", "helpful"):
        rows = [{"group": name, **r} for r in result[name]]
        if fmt == "csv":
            emit(rows, fmt, ["group"] + columns)
        else:
            click.echo(f"most {name}:")
            emit(rows, fmt, columns)
