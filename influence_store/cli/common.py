"""What several command modules share: the ``--db`` option, opening the store, ``-o KEY VALUE`` pairs,
id arguments, and the question asked before loading a task the store names."""

from __future__ import annotations

import functools
import json
import sys

import click

ID = click.IntRange(1, 2**63 - 1)  # what the store can hold: a larger id is a usage error, not an overflow


def db_option(command):
    """``--db PATH|URL`` on a command (overrides the root ``--db``, $INFLUENCE_STORE_DB, ./influence-store.db)."""

    @click.option("--db", "db", default=None, metavar="PATH|URL",
                  help="Store location (default: $INFLUENCE_STORE_DB or ./influence-store.db).")
    @functools.wraps(command)
    def wrapper(*args, db, **kwargs):
        context = click.get_current_context()
        while db is None and context.parent is not None:  # `runs --db X list` and `--db X runs` both count
            context = context.parent
            db = context.params.get("db")
        if db is not None and not db.strip():
            raise click.ClickException("--db is empty; give a store path or URL, or leave --db out for the default")
        return command(*args, db=db, **kwargs)

    return wrapper


def open_store(db, *, write: bool = False, create: bool = False):
    """The store for a command. Reads never create or migrate a store (they say there is none, or that it
    needs `db upgrade`); writes upgrade it; only ``create=True`` commands (init, run, ...) make a new one."""
    from ..store import Store
    from ..store_file import check_revision, connect_for_reading, sqlite_path

    if write or create:
        return Store(db, create=create)
    if sqlite_path(db) is not None:
        connect_for_reading(db).close()
        return Store(db, create=False, upgrade=False)
    store = Store(db, create=False, upgrade=False)
    check_revision(store.revision(), store.location)
    return store


def pairs(values) -> dict:
    """``-o KEY VALUE`` pairs -> dict; a repeated key collects its values in a list
    (``-f patterns a -f patterns b``)."""
    out: dict = {}
    for key, value in values:
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def confirm_stored_task(run: dict, named: str | None, at_terminal: bool) -> str | None:
    """Nothing named: on a terminal, show the task the store names and load it only if the user says so.
    The calling command passes ``stdin_is_terminal()``, so its tests can pretend a person is there."""
    if named not in (None, "-") or not at_terminal:
        return named
    options = f" with options {json.dumps(run['task_options'])}" if run["task_options"] else ""
    click.confirm(f"run {run['id']} was computed from task {run['task_spec']!r}{options}; loading it imports and "
                  f"runs that code. Load it?", abort=True, err=True)
    return run["task_spec"]
