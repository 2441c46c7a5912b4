"""The store: the only place that speaks SQL.

``Store(url)`` opens a database (a SQLite path or any SQLAlchemy URL), upgrades it to the newest
schema, and offers verbs. Scores are written chunk by chunk; each chunk is committed together with
its progress marker, so an interrupted run resumes exactly where it stopped.

``Store`` is one object built from parts that each do one job:

- ``store_connection.py``: opening, SQLite's pragmas and write locks, migrations, backup;
- this module: datasets, examples and runs;
- ``score_store.py``: writing and reading scores (its layout: ``score_layout.py``);
- ``curation_store.py``: model versions, proposals and their reviews, verifications;
- ``store_claims.py``: the blocks of a run that processes share, claimed with leases.

Every verb takes and returns plain values (ints, strings, dicts, lists), never an ORM session.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from .curation_store import CurationStore
from .errors import InfluenceStoreError
from .schema import Dataset, Example, ModelVersion, Run, RunArtifact, RunChunk, RunExample, utcnow
from .score_store import ScoreStore
from .store_claims import BlockClaimVerbs, live_owners
from .store_connection import (CREATE_RUN_LOCK, MIGRATION_LOCK, StoreConnection, _alembic_config,  # noqa: F401
                               _reason, database_url, head_revision)
from .store_file import DB_ENV, DEFAULT_DB, default_location, sqlite_path  # noqa: F401  (re-exported)
from .task import PayloadJSON

RUN_JSON_COLUMNS = ("options_json", "freeze_options_json", "versions_json", "settings_json", "diagnostics_json",
                    "task_options_json")


class Store(StoreConnection, ScoreStore, CurationStore, BlockClaimVerbs):
    """One database. Verbs take and return plain values (ints, strings, dicts, lists)."""

    def __init__(self, location: str | None = None, *, upgrade: bool = True, create: bool = True) -> None:
        self._run_example_ids: dict[int, dict] = {}  # see ScoreStore._check_chunk_ids
        super().__init__(location, upgrade=upgrade, create=create)

    # -- datasets and examples ----------------------------------------------------------------------

    def _dataset_id(self, s: Session, name: str, create: bool = True) -> int | None:
        found = s.scalar(select(Dataset.id).where(Dataset.name == name))
        if found is None and create:
            dataset = Dataset(name=name)
            s.add(dataset)
            s.flush()
            found = dataset.id
        return found

    def require_dataset(self, name: str) -> int:
        with self._session(read=True) as s:
            found = self._dataset_id(s, name, create=False)
            if found is None:
                names = s.scalars(select(Dataset.name).order_by(Dataset.name)).all()
                raise InfluenceStoreError(f"no dataset {name!r}; known datasets: {', '.join(names) or '(none)'}")
            return found

    def _upsert_examples(self, s: Session, dataset_id: int, rows: Sequence[tuple[str, str, Any, Any]]) -> list[int]:
        """Rows of (key, content_hash, label, payload) -> example ids, creating the ones not yet stored."""
        stored = select(Example.id, Example.key, Example.content_hash).where(Example.dataset_id == dataset_id)
        existing = {(key, content_hash): i for i, key, content_hash in s.execute(stored)}
        new = [row for row in rows if (row[0], row[1]) not in existing]
        if new:
            s.execute(Example.__table__.insert(), [
                {"dataset_id": dataset_id, "key": key, "content_hash": content_hash,
                 "label_json": json.dumps(label), "payload_json": _payload_json(payload)}
                for key, content_hash, label, payload in new])
            existing = {(key, content_hash): i for i, key, content_hash in s.execute(stored)}
        return [existing[(key, content_hash)] for key, content_hash, _, _ in rows]

    def examples(self, ids: Iterable[int]) -> dict[int, dict]:
        """Example id -> {id, key, label, payload, dataset}."""
        ids = list(dict.fromkeys(ids))
        out: dict[int, dict] = {}
        with self._session(read=True) as s:
            for start in range(0, len(ids), 900):
                query = select(Example, Dataset.name).join(Dataset).where(Example.id.in_(ids[start:start + 900]))
                for ex, dataset in s.execute(query):
                    out[ex.id] = {"id": ex.id, "key": ex.key, "dataset": dataset, "content_hash": ex.content_hash,
                                  "label": json.loads(ex.label_json) if ex.label_json else None,
                                  "payload": json.loads(ex.payload_json)}
        return out

    def examples_by_key(self, key: str, dataset: str | None = None) -> list[dict]:
        """Stored examples with this key (every dataset, or one), newest content first."""
        with self._session(read=True) as s:
            query = select(Example.id).join(Dataset).where(Example.key == str(key)).order_by(Example.id.desc())
            if dataset is not None:
                query = query.where(Dataset.name == dataset)
            ids = list(s.scalars(query))
        found = self.examples(ids)
        return [found[i] for i in ids]

    def example_history(self, example_ids: Sequence[int]) -> list[dict]:
        """Every run that saw these examples (one identity, any content version): run, model version,
        split, position, loss and self-influence, oldest run first."""
        with self._session(read=True) as s:
            rows = s.execute(select(RunExample, Run.id, ModelVersion.name, Run.approximator, Run.status)
                             .join(Run, Run.id == RunExample.run_id)
                             .join(ModelVersion, ModelVersion.id == Run.model_version_id)
                             .where(RunExample.example_id.in_(list(example_ids))).order_by(Run.id)).all()
            return [{"run_id": run_id, "model_version": version, "approximator": approximator, "status": status,
                     "example_id": r.example_id, "split": r.split, "position": r.position, "loss": r.loss,
                     "self_influence": r.self_influence} for r, run_id, version, approximator, status in rows]

    # -- runs -------------------------------------------------------------------------------------

    def latest_train_run(self, dataset: str) -> dict:
        """The newest finished run that trained on ``dataset``: its training examples are the data set."""
        dataset_id = self.require_dataset(dataset)
        with self._session(read=True) as s:
            run = s.scalar(select(Run).where(Run.train_dataset_id == dataset_id, Run.status == "done")
                           .order_by(Run.id.desc()).limit(1))
            if run is None:
                raise InfluenceStoreError(f"dataset {dataset!r} has no finished run to export from; run one first")
            return _run_dict(run, s)

    def latest_done_run(self, version: str, run_id: int | None = None) -> dict:
        """The newest finished run of a model version (or the given run, checked to belong to it)."""
        self.version(version)  # unknown version -> its own message (outside the session: no nested transaction)
        with self._session(read=True) as s:
            if run_id is None:
                run = s.scalar(select(Run).join(ModelVersion, ModelVersion.id == Run.model_version_id)
                               .where(ModelVersion.name == version, Run.status == "done")
                               .order_by(Run.id.desc()).limit(1))
            else:
                run = self._get_run(s, run_id)
            if run is None:
                raise InfluenceStoreError("model version {version!r} has no finished run; run {run_version} first",
                                          version=version,
                                          run_version=f"execute_run(store, TASK, model_version={version!r})")
            found = _run_dict(run, s)
        if found["model_version"] != version:
            raise InfluenceStoreError("run {run_id} belongs to model version {found!r}, not {version!r}; see "
                                      "{runs_list}", run_id=found["id"], found=found["model_version"],
                                      version=version, runs_list="store.runs()")
        if found["status"] != "done":
            raise InfluenceStoreError("run {run_id} is {status}; finish it first ({resume})", run_id=found["id"],
                                      status=found["status"], resume=f"execute_run(store, TASK, resume={found['id']})")
        return found

    def find_run(self, settings_fingerprint: str) -> dict | None:
        """The newest run with these exact settings, if any."""
        with self._session(read=True) as s:
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
        with self._session() as s:
            if self.is_postgresql:  # what SQLite's BEGIN IMMEDIATE gives: one process registers at a time
                s.execute(text(f"SELECT pg_advisory_xact_lock({CREATE_RUN_LOCK})"))
            raced = s.scalar(select(Run.id).where(Run.settings_fingerprint == settings_fingerprint)
                             .order_by(Run.id.desc()).limit(1))
            if raced is not None:
                return raced
            version = s.scalar(select(ModelVersion).where(ModelVersion.name == version_name))
            if version is None:
                version = ModelVersion(name=version_name, weights_sha256=weights_sha256,
                                       dataset_id=self._dataset_id(s, train_dataset))
                s.add(version)
                s.flush()
            elif version.weights_sha256 is None:
                version.weights_sha256 = weights_sha256
            elif version.weights_sha256 != weights_sha256:
                raise InfluenceStoreError(
                    "model version {version!r} was recorded with other weights (sha256 {recorded}, this model "
                    "{given}); register the new model as a new version ({model_version})", version=version_name,
                    recorded=version.weights_sha256[:12], given=weights_sha256[:12],
                    model_version='model_version="NEW"')
            if version.dataset_id is None:
                version.dataset_id = self._dataset_id(s, train_dataset)
            train_id = self._dataset_id(s, train_dataset)
            test_id = self._dataset_id(s, test_dataset)
            if train_id == test_id:
                raise InfluenceStoreError("train and test datasets must have different names")
            train_ids = self._upsert_examples(s, train_id, train_rows)
            test_ids = self._upsert_examples(s, test_id, test_rows)
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
            run_examples = []
            for split, ids, losses in (("train", train_ids, train_losses), ("test", test_ids, test_losses)):
                for position, (example_id, loss) in enumerate(zip(ids, losses)):
                    run_examples.append({"run_id": run.id, "split": split, "position": position,
                                         "example_id": example_id, "loss": float(loss)})
            s.execute(RunExample.__table__.insert(), run_examples)
            return run.id

    def run(self, run_id: int | str) -> dict:
        with self._session(read=True) as s:
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
            if not last:
                raise InfluenceStoreError(f"no run {number} in {self.location!r}; the store has no runs yet")
            raise InfluenceStoreError("no run {number} in {location!r}; runs go up to {last} (see {runs_list})",
                                      number=number, location=self.location, last=last, runs_list="store.runs()")
        return run

    def runs(self, version: str | None = None, status: str | None = None) -> list[dict]:
        with self._session(read=True) as s:
            query = select(Run).order_by(Run.id)
            if version is not None:
                query = query.join(ModelVersion).where(ModelVersion.name == version)
            if status is not None:
                query = query.where(Run.status == status)
            return [_run_dict(r, s) for r in s.scalars(query)]

    def start_run(self, run_id: int) -> None:
        with self._session() as s:
            run = self._get_run(s, run_id)
            run.status, run.error = "running", None
            run.started_utc = run.started_utc or utcnow()

    def save_artifact(self, run_id: int, name: str, data: bytes) -> None:
        """Keep a blob the run's approximator fitted (replacing one of the same name)."""
        with self._session() as s:
            s.merge(RunArtifact(run_id=run_id, name=name, data=data, created_utc=utcnow()))

    def artifact(self, run_id: int, name: str) -> bytes | None:
        with self._session(read=True) as s:
            found = s.get(RunArtifact, (run_id, name))
            return None if found is None else found.data

    def done_chunks(self, run_id: int) -> list[int]:
        with self._session(read=True) as s:
            return list(s.scalars(select(RunChunk.chunk_index).where(RunChunk.run_id == run_id)))

    def example_ids(self, run_id: int, split: str) -> list[int]:
        """Example ids of a run's split, by position."""
        with self._session(read=True) as s:
            return list(s.scalars(select(RunExample.example_id).where(
                RunExample.run_id == run_id, RunExample.split == split).order_by(RunExample.position)))

    def write_self_influence(self, run_id: int, values: Sequence[float], start: int = 0) -> None:
        """Self-influence of the training examples at positions ``start``, ``start + 1``, ..."""
        with self.engine.begin() as connection:
            connection.execute(update(RunExample).where(
                RunExample.run_id == run_id, RunExample.split == "train",
                RunExample.position == bindparam("pos")).values(self_influence=bindparam("value")),
                [{"pos": start + i, "value": float(v)} for i, v in enumerate(values)])

    def finish_run(self, run_id: int, seconds: float, diagnostics: dict) -> None:
        with self._session() as s:
            run = self._get_run(s, run_id)
            run.status, run.finished_utc = "done", utcnow()
            run.seconds_total = (run.seconds_total or 0.0) + seconds
            run.diagnostics_json = json.dumps(diagnostics, default=str)

    def fail_run(self, run_id: int, error: str, seconds: float) -> None:
        with self._session() as s:
            run = self._get_run(s, run_id)
            run.status, run.error = "failed", error
            run.seconds_total = (run.seconds_total or 0.0) + seconds

    # -- a run's examples ---------------------------------------------------------------------------

    def test_example_id(self, run_id: int, key: str) -> int:
        with self._session(read=True) as s:
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
        with self._session(read=True) as s:
            rows = s.execute(select(RunExample).where(RunExample.run_id == run_id, RunExample.split == split)
                             .order_by(RunExample.position)).scalars()
            return {r.example_id: {"position": r.position, "loss": r.loss, "self_influence": r.self_influence}
                    for r in rows}

    def self_influence(self, run_id: int, k: int | None = None) -> list[dict]:
        """Training examples by self-influence, largest first, with their training loss."""
        with self._session(read=True) as s:
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

    def _with_examples(self, run_id: int, groups: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Add each training example's key, label, loss and self-influence to rows carrying its ``example_id``."""
        info = self.run_examples(run_id, "train")
        examples = self.examples(r["example_id"] for rows in groups.values() for r in rows)
        out = {}
        for name, rows in groups.items():
            out[name] = []
            for row in rows:
                example, seen = examples[row["example_id"]], info[row["example_id"]]
                out[name].append({**row, "key": example["key"], "label": example["label"],
                                  "loss": seen["loss"], "self_influence": seen["self_influence"]})
        return out


def _run_dict(run: Run, s: Session | None = None) -> dict:
    out = {c.name: getattr(run, c.key) for c in Run.__table__.columns}
    for name in RUN_JSON_COLUMNS:
        out[name.removesuffix("_json")] = json.loads(out.pop(name) or "{}")
    if s is not None:
        out["model_version"] = s.get(ModelVersion, run.model_version_id).name
        out["train_dataset"] = s.get(Dataset, run.train_dataset_id).name
        out["test_dataset"] = s.get(Dataset, run.test_dataset_id).name
        out["workers"] = live_owners(s, run.id) if run.status == "running" else []
        if run.status == "running" and not out["workers"]:
            out["status"] = "interrupted"  # no process holds a live lease on it: they all died or were killed
    return out


def _payload_json(payload: Any) -> str:
    """A row's payload as stored: already-encoded descriptions as they are, anything else encoded here."""
    return payload if isinstance(payload, PayloadJSON) else json.dumps(payload)
