"""Where the store is and whether a read may use it, without SQLAlchemy, Alembic or numpy.

Reads (``runs``, ``scores``, ``report``, ...) never create a store, never migrate one and never change
its journal mode: they check here that a store exists at the newest schema and say what to do if not.
The head revision is read from the migration files' ``revision``/``down_revision`` lines, so the check
costs a few file reads instead of importing Alembic; ``runs`` lists with plain ``sqlite3`` for the same
reason (it should start about as fast as ``influence-store --help``). This module is part of the store
layer: the other places that speak SQL are ``store.py`` and the modules its ``Store`` is built from.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from importlib import resources
from pathlib import Path

from .errors import InfluenceStoreError

DEFAULT_DB = "influence-store.db"
DB_ENV = "INFLUENCE_STORE_DB"
SQLITE_HEADER = b"SQLite format 3\x00"
AS_STORE_LOCATION = "as the store location"  # a core message's words for --db (the CLI's: cli/wording.py)
_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=]+)?=\s*(None|'[^']*'|\"[^\"]*\")", re.M)


def default_location() -> str:
    """Where the store lives when no location is given: $INFLUENCE_STORE_DB, else ./influence-store.db."""
    return os.environ.get(DB_ENV) or DEFAULT_DB


def sqlite_path(location: str | None) -> Path | None:
    """The file of a SQLite store (a path or a ``sqlite:///`` URL); None for any other database URL.

    An in-memory database is refused: it would vanish with the process that wrote it."""
    location = location or default_location()
    if "://" not in location:
        if location == ":memory:":  # what sqlite3 and SQLAlchemy take as in-memory, not as a file name
            raise _in_memory(location)
        return Path(location).expanduser()
    scheme, _, rest = location.partition("://")
    if scheme.split("+")[0] != "sqlite":
        return None
    database = rest[1:].split("?")[0] if rest.startswith("/") else rest.split("?")[0]
    if database in ("", ":memory:") or "mode=memory" in location:
        raise _in_memory(location)
    return Path(database).expanduser()


def _in_memory(location: str) -> InfluenceStoreError:
    return InfluenceStoreError(f"store {location!r} is an in-memory database, which disappears when the command "
                               f"ends; give a file path")


def revisions() -> dict[str, str | None]:
    """revision -> down_revision of every migration file that ships with this influence-store."""
    found: dict[str, str | None] = {}
    for entry in resources.files("influence_store.migrations").joinpath("versions").iterdir():
        if entry.name.endswith(".py") and not entry.name.startswith("_"):
            values = {name: None if value == "None" else value[1:-1]
                      for name, value in _REVISION_LINE.findall(entry.read_text())}
            if "revision" in values:
                found[values["revision"]] = values.get("down_revision")
    return found


def head_revision() -> str:
    """The newest schema revision: the one no other revision builds on."""
    known = revisions()
    heads = set(known) - set(known.values())
    if len(heads) != 1:
        raise InfluenceStoreError(f"the installed migrations have {len(heads)} heads; reinstall influence-store")
    return heads.pop()


def check_revision(current: str | None, location: str, tables: set[str] | None = None) -> None:
    """A read needs a store at the head revision: say how to get there otherwise. ``tables`` (the
    database's table names), when known, tell another tool's Alembic database from a newer store."""
    head = head_revision()
    if current == head:
        return
    check_ours(current, location, tables)
    if current not in revisions():
        raise InfluenceStoreError(f"store {location!r} has schema revision {current!r}, newer than this "
                                  f"influence-store knows (head {head!r}); upgrade influence-store")
    raise InfluenceStoreError("store {location!r} is at schema {current!r}, older than this influence-store "
                              "(head {head!r}); upgrade it with {db_upgrade}", location=location, current=current,
                              head=head, db_upgrade=f"Store({location!r})")


def check_ours(current: str | None, location: str, tables: set[str] | None = None) -> None:
    """The database is an influence-store one: it has a schema revision, and a revision this influence-store
    does not know comes with our tables (a newer store), not without them (another tool's Alembic)."""
    if current is None:
        raise InfluenceStoreError("{location!r} is not an influence-store database (no schema revision); give a "
                                  "store {with_db} or create one with {init}", location=location,
                                  with_db=AS_STORE_LOCATION, init=f"Store({location!r})")
    if tables is not None and "runs" not in tables and current not in revisions():
        raise InfluenceStoreError("{location!r} is not an influence-store database (its schema revision {current!r} "
                                  "is not one of influence-store's, and it has no runs table); give a store {with_db}",
                                  location=location, current=current, with_db=AS_STORE_LOCATION)


def _tables_and_revision(connection: sqlite3.Connection) -> tuple[set[str], str | None]:
    tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    current = (connection.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[0] \
        if "alembic_version" in tables else None
    return tables, current


def check_sqlite_file(path: Path, location: str, *, create: bool = False) -> None:
    """The path is a SQLite database, or (``create``) nothing yet or an empty file that can become one.
    A read never creates a store: without ``create`` a missing file is an error."""
    if path.is_dir():
        raise InfluenceStoreError("store path {path!r} is a directory; give a file path {with_db}", path=str(path),
                                  with_db=AS_STORE_LOCATION)
    if not path.exists():
        if create:
            return
        raise InfluenceStoreError("no store at {location!r}; create one with {init} or give its path {with_db}",
                                  location=location, init=f"Store({location!r})", with_db=AS_STORE_LOCATION)
    with open(path, "rb") as handle:
        header = handle.read(16)
    if header != SQLITE_HEADER and (header or not create):
        raise InfluenceStoreError("{location!r} is not a SQLite database; give a new path or an influence-store "
                                  "database {with_db}", location=location, with_db=AS_STORE_LOCATION)


def connect_for_reading(location: str | None = None) -> sqlite3.Connection:
    """A plain sqlite3 connection to an existing store at the head revision (never creates the file)."""
    location = location or default_location()
    path = sqlite_path(location)
    if path is None:
        raise InfluenceStoreError(f"{location!r} is not a SQLite store")
    check_sqlite_file(path, location)
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=60)
        connection.row_factory = sqlite3.Row
        tables, current = _tables_and_revision(connection)
    except sqlite3.DatabaseError as exc:
        if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
            raise InfluenceStoreError(  # SQLite writes its -wal/-shm files beside the store, even to read
                f"cannot open store {location!r}: it or its folder is read-only ({exc}); make both writable or "
                f"copy the store to a writable folder") from None
        raise InfluenceStoreError("cannot open store {location!r}: {reason}; give an influence-store database "
                                  "{with_db}", location=location, reason=str(exc), with_db=AS_STORE_LOCATION) from None
    check_revision(current, location, tables)
    return connection


def list_runs(location: str | None = None, version: str | None = None, status: str | None = None) -> list[dict]:
    """``Store.runs()`` for a SQLite store, read with sqlite3 alone (same keys and values)."""
    query = ("SELECT runs.*, v.name AS model_version, tr.name AS train_dataset, te.name AS test_dataset "
             "FROM runs JOIN model_versions v ON v.id = runs.model_version_id "
             "JOIN datasets tr ON tr.id = runs.train_dataset_id JOIN datasets te ON te.id = runs.test_dataset_id")
    where = [(clause, value) for clause, value in (("v.name = ?", version), ("runs.status = ?", status))
             if value is not None]
    if where:
        query += " WHERE " + " AND ".join(clause for clause, _ in where)
    connection = connect_for_reading(location)
    try:
        rows = connection.execute(query + " ORDER BY runs.id", [value for _, value in where]).fetchall()
        # The processes holding a live lease on an unfinished block (store_claims.live_owners).
        live: dict[int, list[str]] = {}
        for run_id, owner in connection.execute(
                "SELECT DISTINCT run_id, owner FROM run_claims WHERE finished_utc IS NULL AND lease_expires > ? "
                "ORDER BY run_id, owner", (time.time(),)):
            live.setdefault(run_id, []).append(owner)
    finally:
        connection.close()
    out = []
    for row in rows:
        record = dict(row)
        for name in [k for k in record if k.endswith("_json")]:
            record[name.removesuffix("_json")] = json.loads(record.pop(name) or "{}")
        record["workers"] = live.get(record["id"], []) if record["status"] == "running" else []
        if record["status"] == "running" and not record["workers"]:
            record["status"] = "interrupted"  # no process holds a live lease on it: they all died or were killed
        out.append(record)
    return out
