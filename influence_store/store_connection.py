"""How the store holds its database: opening a path or URL, SQLite's pragmas and write locks, schema
migrations, backups.

Part of the store (it speaks SQL); ``Store`` inherits it, and the verbs live beside it (``store.py``,
``score_store.py``, ``curation_store.py``, ``store_claims.py``). On SQLite every write transaction starts
with ``BEGIN IMMEDIATE``: a writer takes the lock up front instead of failing halfway, and a reader
(``self.reader``) starts a plain snapshot that neither waits for nor blocks a writer.
"""

from __future__ import annotations

import os
import sqlite3
import weakref
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import case, create_engine, event, func, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from .errors import InfluenceStoreError
from .schema import Dataset, Example, ModelVersion, Proposal, Run, ScoreBlock, Verification
from .store_file import (AS_STORE_LOCATION, check_ours, check_sqlite_file, default_location, head_revision,
                         revisions, sqlite_path)

MIGRATION_LOCK, CREATE_RUN_LOCK = 7_310_001, 7_310_002  # PostgreSQL advisory lock keys of influence-store
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()  # every store's engine not yet freed


def close_all_stores() -> None:
    """Close the connections of every store opened in this process, including stores no longer referenced
    whose engines wait for the garbage collector (a SQLite store checkpoints its write-ahead log into the
    file when its last connection closes)."""
    for engine in list(_ENGINES):
        engine.dispose()


def database_url(location: str | None = None) -> str:
    """A SQLAlchemy URL for a path or URL (an in-memory SQLite URL is refused); a PostgreSQL URL without a
    driver means psycopg (version 3)."""
    location = location or default_location()
    path = sqlite_path(location)  # refuses an in-memory database
    if "://" not in location:
        return f"sqlite:///{path}"
    scheme, rest = location.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return location


def _alembic_config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("influence_store.migrations")))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config())


def _create_at_head(connection: Connection, head: str) -> None:
    """A new store: the tables as ``schema.py`` declares them and Alembic's version table at the head, as
    Alembic's cookbook builds a database from scratch. The same schema as migrating a blank database, 0.1 s
    sooner (tests/test_migrations.py compares the two on SQLite and PostgreSQL)."""
    from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table

    from .schema import Base

    Base.metadata.create_all(connection)
    version = Table("alembic_version", MetaData(), Column("version_num", String(32), nullable=False),
                    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"))  # as Alembic makes it
    version.create(connection)
    connection.execute(version.insert().values(version_num=head))


class StoreConnection:
    """Opens one database and keeps the rules of talking to it (a base of ``Store``)."""

    def __init__(self, location: str | None = None, *, upgrade: bool = True, create: bool = True) -> None:
        self.url = database_url(location)
        self.location = location or default_location()
        try:
            backend = make_url(self.url).get_backend_name()
        except Exception as exc:  # sqlalchemy.exc.ArgumentError: not a URL it can parse
            raise InfluenceStoreError("cannot use store {location!r}: {reason}; give a file path or a database URL "
                                      "such as postgresql+psycopg://user@host/db",
                                      location=self.location, reason=_reason(exc)) from None
        self.is_sqlite = backend == "sqlite"
        self.is_postgresql = backend == "postgresql"
        if self.is_sqlite:
            self.path = Path(make_url(self.url).database or "")
            try:
                self._check_sqlite_path(create)
            except OSError as exc:  # e.g. a folder on the way that this user may not enter
                raise InfluenceStoreError("cannot use store {path!r}: {reason}; choose another {db_path}",
                                          path=str(self.path), reason=exc.strerror, db_path="store path") from None
        self.engine = self._engine()
        self.reader = self.engine.execution_options(influence_store_read_only=True)
        _ENGINES.add(self.engine)
        self._check_readable()
        if upgrade:
            self.upgrade()

    # -- opening ---------------------------------------------------------------------------------

    def _check_sqlite_path(self, create: bool) -> None:
        path = self.path
        check_sqlite_file(path, str(path), create=create)
        if path.exists():
            return
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InfluenceStoreError(f"cannot create store {str(path)!r}: folder {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise InfluenceStoreError("cannot create store {path!r}: folder {parent!r} is not writable; "
                                      "choose another {db_path}", path=str(path), parent=str(parent),
                                      db_path="store path")

    def _engine(self) -> Engine:
        if not self.is_sqlite:
            return _server_engine(self.url)
        engine = create_engine(self.url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see below)
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection):
            # A writer takes the lock up front (BEGIN IMMEDIATE) instead of failing mid-transaction;
            # a reader (self.reader) starts a plain snapshot and never waits for, or blocks, a writer.
            read_only = connection.get_execution_options().get("influence_store_read_only")
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine

    def _check_readable(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM sqlite_master" if self.is_sqlite else "SELECT 1")
        except DatabaseError as exc:
            read_only = self.is_sqlite and not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK))
            if read_only:
                raise InfluenceStoreError(  # SQLite writes its -wal/-shm files beside the store, even to read
                    f"cannot open store {self.location!r}: it or its folder is read-only ({_reason(exc)}); "
                    f"make both writable or copy the store to a writable folder") from None
            raise InfluenceStoreError("cannot open store {location!r}: {reason}; give an influence-store database "
                                      "{with_db}", location=self.location, reason=_reason(exc),
                                      with_db=AS_STORE_LOCATION) from None

    @contextmanager
    def _session(self, read: bool = False) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error; ``read=True`` for verbs that
        only read (they then neither wait for nor block a writing process)."""
        try:
            with Session(self.reader if read else self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except OperationalError as exc:
            raise InfluenceStoreError(f"store {self.location!r}: {_reason(exc)}") from None

    @contextmanager
    def _write_without_foreign_keys(self) -> Iterator[Connection]:
        """One write transaction with SQLite's foreign keys off for this connection only: schema changes
        (batch migrations recreate tables that others reference) and the score fast path, which checks
        its ids itself. The raw driver connection is ``connection.connection.driver_connection``."""
        with self.engine.connect() as connection:
            raw = connection.connection.driver_connection if self.is_sqlite else None
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=OFF")  # outside a transaction: SQLite ignores it inside one
            try:
                with connection.begin():
                    yield connection
            finally:
                if raw is not None:
                    raw.execute("PRAGMA foreign_keys=ON")

    # -- schema ----------------------------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema revision the database is at (None for a blank database)."""
        from sqlalchemy import inspect

        with self.engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()

    def downgrade(self, revision: str) -> None:
        """Move the schema back to ``revision`` (data in tables that revision lacks is dropped)."""
        from alembic import command

        known = [r.revision for r in _scripts().walk_revisions()] + ["base"]
        if revision not in known:
            raise InfluenceStoreError(f"unknown schema revision {revision!r}; known: {', '.join(known)}")
        try:
            with self._write_without_foreign_keys() as connection:
                command.downgrade(_alembic_config(connection), revision)
        except OperationalError as exc:
            raise InfluenceStoreError(f"cannot downgrade store {self.location!r}: {_reason(exc)}") from None

    def upgrade(self) -> None:
        """Bring the schema to the newest revision: a new store is created at it, an older one migrated by
        Alembic; a database written by a newer influence-store (or another tool) is refused."""
        from sqlalchemy import inspect

        current, head = self.revision(), head_revision()  # read from the migration files: no Alembic at the head
        if current == head:
            return
        if current is not None and current not in revisions():
            with self.engine.connect() as connection:  # another tool's Alembic database is not a newer store
                check_ours(current, self.location, set(inspect(connection).get_table_names()))
            raise InfluenceStoreError(
                f"store {self.location!r} has schema revision {current!r}, newer than this influence-store "
                f"knows (head {head!r}); upgrade influence-store (pip install -U influence-store)")
        if self.is_sqlite and self.path.exists() and not os.access(self.path, os.W_OK):
            raise InfluenceStoreError(f"store {self.location!r} needs a schema upgrade but is read-only")
        try:
            with self._write_without_foreign_keys() as connection:
                if self.is_postgresql:  # processes opening a new store at once: one migrates, the others wait
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                # Checked under the write lock: a store another process is creating right now is ours.
                tables = inspect(connection).get_table_names()
                if tables and "alembic_version" not in tables:  # someone else's database: ours would surprise
                    raise InfluenceStoreError(
                        "{location!r} holds other tables ({tables}) and is not an influence-store database; "
                        "give a new path {with_db}", location=self.location, tables=", ".join(sorted(tables)[:3]),
                        with_db=AS_STORE_LOCATION)
                if not tables:
                    _create_at_head(connection, head)
                else:
                    from alembic import command

                    command.upgrade(_alembic_config(connection), "head")
        except OperationalError as exc:
            raise InfluenceStoreError(f"cannot upgrade store {self.location!r}: {_reason(exc)}") from None
        if self.is_sqlite:  # set once, when the store is created or upgraded; it persists in the file
            self._use_wal()

    def _use_wal(self, seconds: float = 60.0) -> None:
        """Switch the file to WAL. The switch escalates a shared lock to an exclusive one, which SQLite
        refuses at once (no busy wait) while another process that is creating the same store holds its
        write lock: so try again until that process is done."""
        import time

        deadline = time.monotonic() + seconds
        raw = self.engine.raw_connection()  # outside any transaction: SQLite refuses it inside one
        try:
            while True:
                try:
                    raw.driver_connection.execute("PRAGMA journal_mode=WAL")
                    return
                except sqlite3.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            raw.close()

    # -- upkeep ----------------------------------------------------------------------------------

    def backup(self, target: str) -> None:
        """Copy a consistent snapshot of a SQLite store to ``target`` (safe while others write)."""
        if not self.is_sqlite:
            raise InfluenceStoreError("backup is built in for SQLite only; use your database's own tools")
        target_path = Path(target)
        if target_path.exists():
            raise InfluenceStoreError(f"backup target {target!r} exists; choose a new path")
        folder = target_path.parent
        if str(folder) and not folder.is_dir():
            raise InfluenceStoreError(f"backup folder {str(folder)!r} does not exist")
        source = sqlite3.connect(str(self.path))
        try:
            dest = sqlite3.connect(str(target_path))
            with dest:
                source.backup(dest)
            dest.close()
        finally:
            source.close()

    def status(self) -> dict[str, Any]:
        """Schema revision and row counts, for ``db status`` (tables an older schema lacks are left out)."""
        from sqlalchemy import inspect

        with self._session(read=True) as s:
            present = set(inspect(s.connection()).get_table_names())
            counts = {}
            for model in (Dataset, Example, ModelVersion, Run, Proposal, Verification):
                if model.__tablename__ in present:
                    counts[model.__tablename__] = s.scalar(select(func.count()).select_from(model))
            if ScoreBlock.__tablename__ in present:  # every score: the blocks' lengths over their value size
                value_size = case((ScoreBlock.encoding == "<f4", 4), else_=8)
                total = func.coalesce(func.sum(func.length(ScoreBlock.scores) / value_size), 0)
                counts["scores"] = int(s.scalar(select(total)))
        return {"location": self.location, "url": self.url, "revision": self.revision(),
                "head": head_revision(), "rows": counts}


def _server_engine(url: str) -> Engine:
    """A database server's engine (PostgreSQL, ...): connections checked before use, a clear missing driver."""
    try:
        return create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        extra = " (pip install 'influence-store[postgres]')" if url.startswith("postgresql") else ""
        raise InfluenceStoreError(f"the database driver for {make_url(url).drivername!r} is not installed: "
                                  f"{exc.name}{extra}") from None
    except Exception as exc:
        raise InfluenceStoreError(f"cannot open store {url!r}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """The first line of what the database said."""
    said = str(getattr(exc, "orig", exc)) or type(exc).__name__
    return said.strip().splitlines()[0]
