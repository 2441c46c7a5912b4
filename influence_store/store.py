"""The store: the only module that speaks SQL.

``Store(url)`` opens a database (a SQLite path or any SQLAlchemy URL), upgrades it to the newest
schema, and offers verbs. Scores are written chunk by chunk; each chunk is committed together with
its progress marker, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import bindparam, case, create_engine, event, func, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from .errors import InfluenceStoreError
from .store_file import DB_ENV, DEFAULT_DB, default_location, sqlite_path  # noqa: F401  (re-exported)
from .schema import (Dataset, Example, ModelVersion, Proposal, ProposalEvent, Run, RunArtifact, RunChunk, RunExample,
                     ScoreBlock, Verification, utcnow)
from .score_store import ScoreStore
from .store_claims import BlockClaimVerbs, live_owners


def database_url(location: str | None = None) -> str:
    """A SQLAlchemy URL for a path or URL (an in-memory SQLite URL is refused); a PostgreSQL URL without a
    driver means psycopg (version 3)."""
    location = location or default_location()
    path = sqlite_path(location)  # refuses an in-memory database
    if "://" not in location:
        return f"sqlite:///{path}"
    scheme, rest = location.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else location


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


def head_revision() -> str:
    return _scripts().get_current_head()


class Store(ScoreStore, BlockClaimVerbs):
    """One database. Verbs take and return plain values (ints, strings, dicts, lists)."""

    def __init__(self, location: str | None = None, *, upgrade: bool = True, create: bool = True) -> None:
        self.url = database_url(location)
        self.location = location or default_location()
        try:
            self.is_sqlite = make_url(self.url).get_backend_name() == "sqlite"
        except Exception as exc:  # sqlalchemy.exc.ArgumentError: not a URL it can parse
            raise InfluenceStoreError(f"cannot use store {self.location!r}: {_reason(exc)}; give a file path or "
                                      f"a database URL such as postgresql+psycopg://user@host/db") from None
        self.is_postgresql = make_url(self.url).get_backend_name() == "postgresql"
        if self.is_sqlite:
            self.path = Path(make_url(self.url).database or "")
            try:
                self._check_sqlite_path(create)
            except OSError as exc:  # e.g. a folder on the way that this user may not enter
                raise InfluenceStoreError(f"cannot use store {str(self.path)!r}: {exc.strerror}; "
                                          f"choose another --db path") from None
        self.engine = self._engine()
        self.reader = self.engine.execution_options(influence_store_read_only=True)
        self._run_example_ids: dict[int, dict[str, set[int]]] = {}  # see _check_chunk_ids
        self._check_readable()
        if upgrade:
            self.upgrade()

    # -- opening ---------------------------------------------------------------------------------

    def _check_sqlite_path(self, create: bool) -> None:
        path = self.path
        if path.is_dir():
            raise InfluenceStoreError(f"store path {str(path)!r} is a directory; give a file path with --db")
        if path.exists():
            with open(path, "rb") as handle:
                header = handle.read(16)
            if header and header != b"SQLite format 3\x00":
                raise InfluenceStoreError(
                    f"{str(path)!r} is not a SQLite database; give a new path or an influence-store database with --db")
            return
        if not create:
            raise InfluenceStoreError(f"no store at {str(path)!r}; create one with "
                                      f"`influence-store init` or give its path with --db")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InfluenceStoreError(f"cannot create store {str(path)!r}: folder {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise InfluenceStoreError(f"cannot create store {str(path)!r}: folder {str(parent)!r} is not writable; "
                                      f"choose another --db path")

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
            if self.is_sqlite and not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)):
                raise InfluenceStoreError(  # SQLite writes its -wal/-shm files beside the store, even to read
                    f"cannot open store {self.location!r}: it or its folder is read-only ({_reason(exc)}); "
                    f"make both writable or copy the store to a writable folder") from None
            raise InfluenceStoreError(f"cannot open store {self.location!r}: {_reason(exc)}; "
                                      f"give an influence-store database with --db") from None

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
            with self._migrating() as connection:
                command.downgrade(_alembic_config(connection), revision)
        except OperationalError as exc:
            raise InfluenceStoreError(f"cannot downgrade store {self.location!r}: {_reason(exc)}") from None

    @contextmanager
    def _migrating(self) -> Iterator:
        """One transaction for a schema change. SQLite's foreign keys are off meanwhile: batch migrations
        recreate tables that other tables reference (Alembic's batch mode), which they would refuse."""
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

    def upgrade(self) -> None:
        """Upgrade the schema to head; refuse a database written by a newer influence-store."""
        from alembic import command
        from alembic.script import ScriptDirectory
        from sqlalchemy import inspect

        current, head = self.revision(), head_revision()
        if current == head:
            return
        known = {rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}
        if current is not None and current not in known:
            raise InfluenceStoreError(
                f"store {self.location!r} has schema revision {current!r}, newer than this influence-store "
                f"knows (head {head!r}); upgrade influence-store (pip install -U influence-store)")
        if self.is_sqlite and self.path.exists() and not os.access(self.path, os.W_OK):
            raise InfluenceStoreError(f"store {self.location!r} needs a schema upgrade but is read-only")
        try:
            with self._migrating() as connection:
                if self.is_postgresql:  # processes opening a new store at once: one migrates, the others wait
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                # Checked under the write lock: a store another process is creating right now is ours.
                tables = inspect(connection).get_table_names()
                if tables and "alembic_version" not in tables:  # someone else's database: ours would surprise
                    raise InfluenceStoreError(
                        f"{self.location!r} holds other tables ({', '.join(sorted(tables)[:3])}) and is not an "
                        f"influence-store database; give a new path with --db")
                command.upgrade(_alembic_config(connection), "head")
        except OperationalError as exc:
            raise InfluenceStoreError(f"cannot upgrade store {self.location!r}: {_reason(exc)}") from None
        if self.is_sqlite:  # set once, when the store is created or upgraded; it persists in the file
            raw = self.engine.raw_connection()  # outside any transaction: SQLite refuses it inside one
            try:
                raw.driver_connection.execute("PRAGMA journal_mode=WAL")
            finally:
                raw.close()

    @contextmanager
    def session(self, read: bool = False) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error; ``read=True`` for verbs that
        only read (they then neither wait for nor block a writing process)."""
        try:
            with Session(self.reader if read else self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except OperationalError as exc:
            raise InfluenceStoreError(f"store {self.location!r}: {_reason(exc)}") from None

    def backup(self, target: str) -> None:
        """Copy a consistent snapshot of a SQLite store to ``target`` (safe while others write)."""
        if not self.is_sqlite:
            raise InfluenceStoreError("backup is built in for SQLite only; use your database's own tools")
        target_path = Path(target)
        if target_path.exists():
            raise InfluenceStoreError(f"backup target {target!r} exists; choose a new path")
        if not target_path.parent.is_dir() if str(target_path.parent) else False:
            raise InfluenceStoreError(f"backup folder {str(target_path.parent)!r} does not exist")
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

        with self.session(read=True) as s:
            present = set(inspect(s.connection()).get_table_names())
            counts = {model.__tablename__: s.scalar(select(func.count()).select_from(model))
                      for model in (Dataset, Example, ModelVersion, Run, Proposal, Verification)
                      if model.__tablename__ in present}
            if ScoreBlock.__tablename__ in present:
                counts["scores"] = int(s.scalar(select(func.coalesce(func.sum(func.length(ScoreBlock.scores) / case(
                    (ScoreBlock.encoding == "<f4", 4), else_=8)), 0))))  # every score: the blocks' lengths
        return {"location": self.location, "url": self.url, "revision": self.revision(),
                "head": head_revision(), "rows": counts}

    # -- datasets and examples ----------------------------------------------------------------------

    def dataset_id(self, session: Session, name: str, create: bool = True) -> int | None:
        found = session.scalar(select(Dataset.id).where(Dataset.name == name))
        if found is None and create:
            dataset = Dataset(name=name)
            session.add(dataset)
            session.flush()
            found = dataset.id
        return found

    def require_dataset(self, name: str) -> int:
        with self.session(read=True) as s:
            found = self.dataset_id(s, name, create=False)
            if found is None:
                names = s.scalars(select(Dataset.name).order_by(Dataset.name)).all()
                raise InfluenceStoreError(f"no dataset {name!r}; known datasets: {', '.join(names) or '(none)'}")
            return found

    def upsert_examples(self, session: Session, dataset_id: int, rows: Sequence[tuple[str, str, Any, Any]]) -> list[int]:
        """Rows of (key, content_hash, label, payload) -> example ids, creating the ones not yet stored."""
        existing = {(k, h): i for i, k, h in session.execute(
            select(Example.id, Example.key, Example.content_hash).where(Example.dataset_id == dataset_id))}
        new = [(k, h, l, p) for k, h, l, p in rows if (k, h) not in existing]
        if new:
            session.execute(Example.__table__.insert(), [
                {"dataset_id": dataset_id, "key": k, "content_hash": h,
                 "label_json": json.dumps(l), "payload_json": json.dumps(p)} for k, h, l, p in new])
            existing = {(k, h): i for i, k, h in session.execute(
                select(Example.id, Example.key, Example.content_hash).where(Example.dataset_id == dataset_id))}
        return [existing[(k, h)] for k, h, _, _ in rows]

    def examples(self, ids: Iterable[int]) -> dict[int, dict]:
        """Example id -> {id, key, label, payload, dataset}."""
        ids = list(dict.fromkeys(ids))
        out: dict[int, dict] = {}
        with self.session(read=True) as s:
            for start in range(0, len(ids), 900):
                for row in s.execute(select(Example, Dataset.name).join(Dataset).where(
                        Example.id.in_(ids[start:start + 900]))):
                    ex, dataset = row
                    out[ex.id] = {"id": ex.id, "key": ex.key, "dataset": dataset, "content_hash": ex.content_hash,
                                  "label": json.loads(ex.label_json) if ex.label_json else None,
                                  "payload": json.loads(ex.payload_json)}
        return out

    # -- model versions ---------------------------------------------------------------------------

    def version(self, name: str) -> dict:
        with self.session(read=True) as s:
            found = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if found is None:
                names = s.scalars(select(ModelVersion.name).order_by(ModelVersion.id)).all()
                raise InfluenceStoreError(
                    f"no model version {name!r}; known versions: {', '.join(names) or '(none)'} "
                    f"(register one with `influence-store versions add`)")
            return self._version_dict(s, found)

    def _version_dict(self, s: Session, v: ModelVersion) -> dict:
        parent = s.get(ModelVersion, v.parent_id) if v.parent_id else None
        dataset = s.get(Dataset, v.dataset_id) if v.dataset_id else None
        runs = s.scalar(select(func.count()).select_from(Run).where(Run.model_version_id == v.id))
        return {"id": v.id, "name": v.name, "parent": parent.name if parent else None,
                "checkpoint_path": v.checkpoint_path, "checkpoint_sha256": v.checkpoint_sha256,
                "weights_sha256": v.weights_sha256, "dataset": dataset.name if dataset else None,
                "created_utc": v.created_utc, "notes": v.notes, "runs": runs}

    def add_version(self, name: str, parent: str | None = None, checkpoint_path: str | None = None,
                    checkpoint_sha256: str | None = None, dataset: str | None = None, notes: str | None = None,
                    weights_sha256: str | None = None, session: Session | None = None) -> dict:
        def add(s: Session) -> dict:
            if s.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
                raise InfluenceStoreError(f"model version {name!r} already exists; choose a new name")
            parent_id = None
            if parent is not None:
                parent_id = s.scalar(select(ModelVersion.id).where(ModelVersion.name == parent))
                if parent_id is None:
                    raise InfluenceStoreError(f"parent version {parent!r} does not exist; see `influence-store versions list`")
            dataset_id = self.dataset_id(s, dataset) if dataset else None
            version = ModelVersion(name=name, parent_id=parent_id, checkpoint_path=checkpoint_path,
                                   checkpoint_sha256=checkpoint_sha256, dataset_id=dataset_id, notes=notes,
                                   weights_sha256=weights_sha256)
            s.add(version)
            s.flush()
            return self._version_dict(s, version)

        if session is not None:
            return add(session)
        with self.session() as s:
            return add(s)

    def version_for_weights(self, weights_sha256: str) -> str | None:
        """The oldest model version recorded with exactly these weights, if any."""
        with self.session(read=True) as s:
            return s.scalar(select(ModelVersion.name).where(ModelVersion.weights_sha256 == weights_sha256)
                            .order_by(ModelVersion.id).limit(1))

    def versions(self) -> list[dict]:
        with self.session(read=True) as s:
            return [self._version_dict(s, v) for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]

    # -- runs -------------------------------------------------------------------------------------

    def latest_train_run(self, dataset: str) -> dict:
        """The newest finished run that trained on ``dataset``: its training examples are the data set."""
        dataset_id = self.require_dataset(dataset)
        with self.session(read=True) as s:
            run = s.scalar(select(Run).where(Run.train_dataset_id == dataset_id, Run.status == "done")
                           .order_by(Run.id.desc()).limit(1))
            if run is None:
                raise InfluenceStoreError(f"dataset {dataset!r} has no finished run to export from; run one first")
            return _run_dict(run, s)

    def find_run(self, settings_fingerprint: str) -> dict | None:
        """The newest run with these exact settings, if any."""
        with self.session(read=True) as s:
            run = s.scalar(select(Run).where(Run.settings_fingerprint == settings_fingerprint)
                           .order_by(Run.id.desc()).limit(1))
            return _run_dict(run) if run else None

    def create_run(self, *, version_name: str, weights_sha256: str, train_dataset: str, test_dataset: str,
                   train_rows: Sequence[tuple], test_rows: Sequence[tuple], train_losses: Sequence[float],
                   test_losses: Sequence[float], task_spec: str, task_options: dict, settings: dict,
                   settings_fingerprint: str, chunks_total: int) -> int:
        """Register examples, the model version (created on first use) and a pending run, in one transaction.

        When another process created the run with these settings meanwhile, returns that run's id instead,
        so both processes work on one run (each chunk is stored once)."""
        with self.session() as s:
            if self.is_postgresql:  # what SQLite's BEGIN IMMEDIATE gives: one process registers at a time
                s.execute(text(f"SELECT pg_advisory_xact_lock({CREATE_RUN_LOCK})"))
            raced = s.scalar(select(Run.id).where(Run.settings_fingerprint == settings_fingerprint)
                             .order_by(Run.id.desc()).limit(1))
            if raced is not None:
                return raced
            version = s.scalar(select(ModelVersion).where(ModelVersion.name == version_name))
            if version is None:
                version = ModelVersion(name=version_name, weights_sha256=weights_sha256,
                                       dataset_id=self.dataset_id(s, train_dataset))
                s.add(version)
                s.flush()
            elif version.weights_sha256 is None:
                version.weights_sha256 = weights_sha256
            elif version.weights_sha256 != weights_sha256:
                raise InfluenceStoreError(
                    f"model version {version_name!r} was recorded with other weights (sha256 "
                    f"{version.weights_sha256[:12]}, this model {weights_sha256[:12]}); register the new model as "
                    f"a new version (--model-version NEW)")
            if version.dataset_id is None:
                version.dataset_id = self.dataset_id(s, train_dataset)
            train_id = self.dataset_id(s, train_dataset)
            test_id = self.dataset_id(s, test_dataset)
            if train_id == test_id:
                raise InfluenceStoreError("train and test datasets must have different names")
            train_ids = self.upsert_examples(s, train_id, train_rows)
            test_ids = self.upsert_examples(s, test_id, test_rows)
            run = Run(model_version_id=version.id, train_dataset_id=train_id, test_dataset_id=test_id,
                      task_spec=task_spec, task_options_json=json.dumps(task_options, default=str),
                      approximator=settings["approximator"], options_json=json.dumps(settings["options"]),
                      freeze=settings["freeze"], freeze_options_json=json.dumps(settings["freeze_options"]),
                      tracked_fingerprint=settings["tracked_fingerprint"], num_params=settings["num_params"],
                      seed=settings["seed"], effective_damping=float(settings["effective_damping"]),
                      sign_convention=settings["sign_convention"], versions_json=json.dumps(settings["versions"]),
                      device=settings["device"], settings_json=json.dumps(settings, default=str),
                      settings_fingerprint=settings_fingerprint, status="pending", n_train=len(train_ids),
                      n_test=len(test_ids), chunks_total=chunks_total, chunks_done=0)
            s.add(run)
            s.flush()
            s.execute(RunExample.__table__.insert(), [
                {"run_id": run.id, "split": split, "position": i, "example_id": eid, "loss": float(loss)}
                for split, ids, losses in (("train", train_ids, train_losses), ("test", test_ids, test_losses))
                for i, (eid, loss) in enumerate(zip(ids, losses))])
            return run.id

    def run(self, run_id: int | str) -> dict:
        with self.session(read=True) as s:
            return _run_dict(self._get_run(s, run_id), s)

    def _get_run(self, s: Session, run_id: int | str) -> Run:
        try:
            number = int(run_id)
        except (TypeError, ValueError):
            raise InfluenceStoreError(f"run id must be a number, got {run_id!r}") from None
        if not 0 < number < 2**63:
            raise InfluenceStoreError(f"run id must be a positive number below 2**63, got {run_id}")
        run = s.get(Run, number)
        if run is None:
            last = s.scalar(select(func.max(Run.id)))
            raise InfluenceStoreError(f"no run {number} in {self.location!r}"
                                      + (f"; runs go up to {last} (see `influence-store runs list`)" if last else
                                         "; the store has no runs yet"))
        return run

    def runs(self, version: str | None = None, status: str | None = None) -> list[dict]:
        with self.session(read=True) as s:
            query = select(Run).order_by(Run.id)
            if version is not None:
                query = query.join(ModelVersion).where(ModelVersion.name == version)
            if status is not None:
                query = query.where(Run.status == status)
            return [_run_dict(r, s) for r in s.scalars(query)]

    def start_run(self, run_id: int) -> None:
        with self.session() as s:
            run = self._get_run(s, run_id)
            run.status, run.error = "running", None
            run.started_utc = run.started_utc or utcnow()

    def save_artifact(self, run_id: int, name: str, data: bytes) -> None:
        """Keep a blob the run's approximator fitted (replacing one of the same name)."""
        with self.session() as s:
            s.merge(RunArtifact(run_id=run_id, name=name, data=data, created_utc=utcnow()))

    def artifact(self, run_id: int, name: str) -> bytes | None:
        with self.session(read=True) as s:
            found = s.get(RunArtifact, (run_id, name))
            return None if found is None else found.data

    def done_chunks(self, run_id: int) -> list[int]:
        with self.session(read=True) as s:
            return list(s.scalars(select(RunChunk.chunk_index).where(RunChunk.run_id == run_id)))

    def example_ids(self, run_id: int, split: str) -> list[int]:
        """Example ids of a run's split, by position."""
        with self.session(read=True) as s:
            return list(s.scalars(select(RunExample.example_id).where(
                RunExample.run_id == run_id, RunExample.split == split).order_by(RunExample.position)))

    def write_self_influence(self, run_id: int, values: Sequence[float]) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(RunExample).where(
                RunExample.run_id == run_id, RunExample.split == "train",
                RunExample.position == bindparam("pos")).values(self_influence=bindparam("value")),
                [{"pos": i, "value": float(v)} for i, v in enumerate(values)])

    def finish_run(self, run_id: int, seconds: float, diagnostics: dict) -> None:
        with self.session() as s:
            run = self._get_run(s, run_id)
            run.status, run.finished_utc = "done", utcnow()
            run.seconds_total = (run.seconds_total or 0.0) + seconds
            run.diagnostics_json = json.dumps(diagnostics, default=str)

    def fail_run(self, run_id: int, error: str, seconds: float) -> None:
        with self.session() as s:
            run = self._get_run(s, run_id)
            run.status, run.error = "failed", error
            run.seconds_total = (run.seconds_total or 0.0) + seconds

    # -- reading scores -----------------------------------------------------------------------------

    def test_example_id(self, run_id: int, key: str) -> int:
        with self.session(read=True) as s:
            run = self._get_run(s, run_id)
            found = s.scalar(select(RunExample.example_id).join(Example, Example.id == RunExample.example_id).where(
                RunExample.run_id == run.id, RunExample.split == "test", Example.key == str(key)))
            if found is None:
                sample = s.scalars(select(Example.key).join(RunExample, Example.id == RunExample.example_id).where(
                    RunExample.run_id == run.id, RunExample.split == "test").order_by(RunExample.position).limit(5))
                raise InfluenceStoreError(f"run {run.id} has no test example with key {key!r}; "
                                          f"test keys look like: {', '.join(sample)}")
            return found

    def run_examples(self, run_id: int, split: str) -> dict[int, dict]:
        """Example id -> {position, loss, self_influence} for one split of a run."""
        with self.session(read=True) as s:
            rows = s.execute(select(RunExample).where(RunExample.run_id == run_id, RunExample.split == split)
                             .order_by(RunExample.position)).scalars()
            return {r.example_id: {"position": r.position, "loss": r.loss, "self_influence": r.self_influence}
                    for r in rows}

    def self_influence(self, run_id: int, k: int | None = None) -> list[dict]:
        """Training examples by self-influence, largest first, with their training loss."""
        with self.session(read=True) as s:
            run = self._get_run(s, run_id)
            query = (select(RunExample.example_id, RunExample.self_influence, RunExample.loss, Example.key,
                            Example.label_json).join(Example, Example.id == RunExample.example_id)
                     .where(RunExample.run_id == run.id, RunExample.split == "train",
                            RunExample.self_influence.is_not(None))
                     .order_by(RunExample.self_influence.desc()))
            if k is not None:
                query = query.limit(k)
            return [{"example_id": e, "key": key, "label": json.loads(lab) if lab else None, "self_influence": si,
                     "loss": loss} for e, si, loss, key, lab in s.execute(query)]

    # -- proposals and reviews ---------------------------------------------------------------------

    def open_removals(self, dataset_id: int) -> dict[int, dict]:
        """Example id -> its newest proposal that is proposed, accepted or applied, for one dataset."""
        with self.session(read=True) as s:
            rows = s.execute(select(Proposal).join(Example, Example.id == Proposal.example_id).where(
                Example.dataset_id == dataset_id, Proposal.status.in_(("proposed", "accepted", "applied")))
                .order_by(Proposal.id)).scalars()
            return {p.example_id: _proposal_dict(p) for p in rows}

    def add_proposals(self, run_id: int, rule: str, rule_options: dict, candidates: Sequence[tuple[int, dict]],
                      actor: str) -> list[int]:
        """Store (example id, evidence) candidates as proposals, each with its creation event."""
        with self.session() as s:
            train = set(s.scalars(select(RunExample.example_id).where(
                RunExample.run_id == run_id, RunExample.split == "train")))
            ids = []
            for rank, (example_id, evidence) in enumerate(candidates, start=1):
                if example_id not in train:  # test or validation examples are never proposed for removal
                    raise InfluenceStoreError(f"rule {rule!r} proposed example {example_id}, which is not a "
                                              f"training example of run {run_id}; fix the rule")
                proposal = Proposal(run_id=run_id, example_id=example_id, rule=rule,
                                    rule_options_json=json.dumps(rule_options, default=str), rank=rank,
                                    evidence_json=json.dumps(evidence, default=float), status="proposed")
                s.add(proposal)
                s.flush()
                s.add(ProposalEvent(proposal_id=proposal.id, from_status=None, to_status="proposed", actor=actor,
                                    note=f"rule {rule}"))
                ids.append(proposal.id)
            return ids

    def proposals(self, ids: Sequence[int] | None = None, status: str | None = None, rule: str | None = None,
                  run_id: int | None = None, dataset: str | None = None, applied_version: str | None = None) -> list[dict]:
        with self.session(read=True) as s:
            query = (select(Proposal).join(Example, Example.id == Proposal.example_id)
                     .join(Dataset, Dataset.id == Example.dataset_id).order_by(Proposal.id))
            if ids is not None:
                query = query.where(Proposal.id.in_([int(i) for i in ids if 0 < int(i) < 2**63]))
            if status is not None:
                query = query.where(Proposal.status == status)
            if rule is not None:
                query = query.where(Proposal.rule == rule)
            if run_id is not None:
                query = query.where(Proposal.run_id == run_id)
            if dataset is not None:
                query = query.where(Dataset.name == dataset)
            if applied_version is not None:
                query = query.join(ModelVersion, ModelVersion.id == Proposal.applied_version_id).where(
                    ModelVersion.name == applied_version)
            found = [_proposal_dict(p) for p in s.scalars(query)]
        examples = self.examples(p["example_id"] for p in found)
        for p in found:
            p.update(key=examples[p["example_id"]]["key"], label=examples[p["example_id"]]["label"],
                     dataset=examples[p["example_id"]]["dataset"])
        return found

    def proposal_events(self, proposal_id: int) -> list[dict]:
        with self.session(read=True) as s:
            return [{"from": e.from_status, "to": e.to_status, "actor": e.actor, "note": e.note,
                     "time_utc": e.created_utc,
                     "new_label": json.loads(e.new_label_json) if e.new_label_json is not None else None}
                    for e in s.scalars(select(ProposalEvent).where(ProposalEvent.proposal_id == proposal_id)
                                       .order_by(ProposalEvent.id))]

    def transition(self, ids: Sequence[int], allowed: dict[str, str], actor: str, note: str | None,
                   applied_version: str | None = None, new_label: Any = None) -> list[dict]:
        """Move proposals along ``allowed`` (from status -> to status), all or none, one event each.
        ``new_label`` (not None) makes an acceptance a relabel; any other transition clears it."""
        version_id = None
        if applied_version is not None:
            with self.session(read=True) as s:
                version_id = s.scalar(select(ModelVersion.id).where(ModelVersion.name == applied_version))
        return self.decide([(pid, allowed, note, new_label) for pid in ids], actor, version_id)

    def decide(self, decisions: Sequence[tuple[int, dict[str, str], str | None, Any]], actor: str,
               applied_version_id: int | None = None) -> list[dict]:
        """Apply (proposal id, allowed transitions, note, new label or None) decisions, all or none, one
        event each: the one verb every review path (CLI, file import, web page) writes through."""
        with self.session() as s:
            changed = []
            for pid, allowed, note, new_label in decisions:
                proposal = s.get(Proposal, int(pid)) if 0 < int(pid) < 2**63 else None
                if proposal is None:
                    raise InfluenceStoreError(f"no proposal {pid}; see `influence-store proposals list`")
                if proposal.status not in allowed:
                    raise InfluenceStoreError(
                        f"proposal {pid} is {proposal.status}; only {' or '.join(allowed)} proposals can become "
                        f"{next(iter(allowed.values()))}" + (" (applied removals are final)"
                                                              if proposal.status == "applied" else ""))
                before, proposal.status = proposal.status, allowed[proposal.status]
                proposal.reviewer, proposal.note, proposal.updated_utc = actor, note, utcnow()
                proposal.new_label_json = None if new_label is None else json.dumps(new_label)
                if applied_version_id is not None:
                    proposal.applied_version_id = applied_version_id
                s.add(ProposalEvent(proposal_id=proposal.id, from_status=before, to_status=proposal.status,
                                    actor=actor, note=note, new_label_json=proposal.new_label_json))
                changed.append(_proposal_dict(proposal))
            return changed

    def example_history(self, example_ids: Sequence[int]) -> list[dict]:
        """Every run that saw these examples (one identity, any content version): run, model version,
        split, position, loss and self-influence, oldest run first."""
        with self.session(read=True) as s:
            rows = s.execute(select(RunExample, Run.id, ModelVersion.name, Run.approximator, Run.status)
                             .join(Run, Run.id == RunExample.run_id)
                             .join(ModelVersion, ModelVersion.id == Run.model_version_id)
                             .where(RunExample.example_id.in_(list(example_ids))).order_by(Run.id)).all()
            return [{"run_id": run_id, "model_version": version, "approximator": approximator, "status": status,
                     "example_id": r.example_id, "split": r.split, "position": r.position, "loss": r.loss,
                     "self_influence": r.self_influence} for r, run_id, version, approximator, status in rows]

    def examples_by_key(self, key: str, dataset: str | None = None) -> list[dict]:
        """Stored examples with this key (every dataset, or one), newest content first."""
        with self.session(read=True) as s:
            query = select(Example.id).join(Dataset).where(Example.key == str(key)).order_by(Example.id.desc())
            if dataset is not None:
                query = query.where(Dataset.name == dataset)
            ids = list(s.scalars(query))
        found = self.examples(ids)
        return [found[i] for i in ids]

    def apply_removals(self, ids: Sequence[int], version: str, parent: str | None, dataset: str, actor: str,
                       note: str | None) -> dict:
        """Create model version ``version`` and mark the accepted proposals ``ids`` applied in it, atomically."""
        with self.session() as s:
            created = self.add_version(version, parent=parent, dataset=dataset, session=s,
                                       notes=note or f"exported without {len(ids)} removals")
            for pid in ids:
                proposal = s.get(Proposal, int(pid))
                if proposal is None or proposal.status != "accepted":
                    raise InfluenceStoreError(f"proposal {pid} is no longer accepted; export again")
                proposal.status, proposal.applied_version_id = "applied", created["id"]
                proposal.updated_utc = utcnow()
                done = ("removed" if proposal.new_label_json is None
                        else f"relabelled to {proposal.new_label_json}")
                s.add(ProposalEvent(proposal_id=proposal.id, from_status="accepted", to_status="applied",
                                    actor=actor, note=f"exported; {done} in model version {version}",
                                    new_label_json=proposal.new_label_json))
            return created

    def removed_in_lineage(self, version: str) -> dict[tuple[str, str], dict]:
        """(key, content hash) -> applied proposal, for removals applied in ``version`` or its ancestors.

        A version not registered yet has no known lineage, so every applied removal counts: a model
        retrained on the uncurated data under a new name must not bring removed examples back silently.
        """
        with self.session(read=True) as s:
            lineage, current = [], s.scalar(select(ModelVersion).where(ModelVersion.name == version))
            while current is not None and current.id not in lineage:
                lineage.append(current.id)
                current = s.get(ModelVersion, current.parent_id) if current.parent_id else None
            query = (select(Proposal, Example.key, Example.content_hash)
                     .join(Example, Example.id == Proposal.example_id).where(Proposal.status == "applied"))
            if lineage:
                query = query.where(Proposal.applied_version_id.in_(lineage))
            rows = s.execute(query).all()
            return {(key, h): _proposal_dict(p) for p, key, h in rows}

    def latest_done_run(self, version: str, run_id: int | None = None) -> dict:
        """The newest finished run of a model version (or the given run, checked to belong to it)."""
        self.version(version)  # unknown version -> its own message (outside the session: no nested transaction)
        with self.session(read=True) as s:
            query = (select(Run).join(ModelVersion, ModelVersion.id == Run.model_version_id)
                     .where(ModelVersion.name == version, Run.status == "done").order_by(Run.id.desc()).limit(1))
            run = s.scalar(query) if run_id is None else self._get_run(s, run_id)
            if run is None:
                raise InfluenceStoreError(f"model version {version!r} has no finished run; run "
                                          f"`influence-store run TASK --model-version {version}` first")
            found = _run_dict(run, s)
        if found["model_version"] != version:
            raise InfluenceStoreError(f"run {found['id']} belongs to model version {found['model_version']!r}, "
                                      f"not {version!r}; see `influence-store runs list`")
        if found["status"] != "done":
            raise InfluenceStoreError(f"run {found['id']} is {found['status']}; finish it first "
                                      f"(influence-store run --resume {found['id']})")
        return found

    def add_verification(self, **values: Any) -> int:
        with self.session() as s:
            row = Verification(**{**values, "proposal_ids_json": json.dumps(values.pop("proposal_ids_json"))})
            s.add(row)
            s.flush()
            return row.id

    def verifications(self, run_id: int | None = None) -> list[dict]:
        with self.session(read=True) as s:
            query = select(Verification).order_by(Verification.id)
            if run_id is not None:
                query = query.where(Verification.run_id == run_id)
            return [{**{c.name: getattr(v, c.key) for c in Verification.__table__.columns},
                     "proposal_ids": json.loads(v.proposal_ids_json)} for v in s.scalars(query)]

    def set_checkpoint(self, name: str, path: str, sha256: str, notes: str | None) -> dict:
        """Record the checkpoint of a version created earlier without one (e.g. by ``export``)."""
        with self.session() as s:
            version = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if version.checkpoint_sha256 is not None:
                raise InfluenceStoreError(f"model version {name!r} already exists with a checkpoint; choose a new name")
            version.checkpoint_path, version.checkpoint_sha256 = path, sha256
            version.notes = notes or version.notes
            return self._version_dict(s, version)

    def _with_examples(self, run_id: int, groups: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Add each training example's key, label, loss and self-influence to rows carrying its ``example_id``."""
        info = self.run_examples(run_id, "train")
        examples = self.examples(r["example_id"] for rows in groups.values() for r in rows)
        return {name: [{**r, "key": examples[r["example_id"]]["key"], "label": examples[r["example_id"]]["label"],
                        **{k: info[r["example_id"]][k] for k in ("loss", "self_influence")}} for r in rows]
                for name, rows in groups.items()}


MIGRATION_LOCK, CREATE_RUN_LOCK = 7_310_001, 7_310_002  # PostgreSQL advisory lock keys of influence-store


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


def _run_dict(run: Run, s: Session | None = None) -> dict:
    out = {c.name: getattr(run, c.key) for c in Run.__table__.columns}
    for name in ("options_json", "freeze_options_json", "versions_json", "settings_json", "diagnostics_json",
                 "task_options_json"):
        out[name.removesuffix("_json")] = json.loads(out.pop(name) or "{}")
    if s is not None:
        out["model_version"] = s.get(ModelVersion, run.model_version_id).name
        out["train_dataset"] = s.get(Dataset, run.train_dataset_id).name
        out["test_dataset"] = s.get(Dataset, run.test_dataset_id).name
        out["workers"] = live_owners(s, run.id) if run.status == "running" else []
        if run.status == "running" and not out["workers"]:
            out["status"] = "interrupted"  # no process holds a live lease on it: they all died or were killed
    return out


def _proposal_dict(p: Proposal) -> dict:
    return {"id": p.id, "run_id": p.run_id, "example_id": p.example_id, "rule": p.rule, "rank": p.rank,
            "status": p.status, "evidence": json.loads(p.evidence_json),
            "rule_options": json.loads(p.rule_options_json), "reviewer": p.reviewer, "note": p.note,
            "applied_version_id": p.applied_version_id, "created_utc": p.created_utc,
            "new_label": json.loads(p.new_label_json) if p.new_label_json is not None else None,
            "outcome": _outcome(p),
            "updated_utc": p.updated_utc}


def _outcome(p: Proposal) -> str | None:
    """What an accepted or applied proposal does to its example: ``remove`` or ``relabel``."""
    if p.status not in ("accepted", "applied"):
        return None
    return "remove" if p.new_label_json is None else "relabel"


def _reason(exc: Exception) -> str:
    text_ = str(getattr(exc, "orig", exc)) or type(exc).__name__
    return text_.strip().splitlines()[0]
