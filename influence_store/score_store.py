"""The score half of ``Store``: writing a run's chunks of scores and reading them back (SQL lives here
and in score_layout.py, which describes the layout)."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np
from sqlalchemy import select, update

from . import score_layout
from .errors import InfluenceStoreError
from .schema import Run, RunChunk, RunExample, ScoreBlock, TrainAggregate, utcnow


class ScoreStore:
    """Score verbs of ``Store`` (a mixin: it uses the store's engine, sessions and run lookups)."""

    _run_example_ids: dict[int, dict]

    def write_chunk(self, run_id: int, chunk_index: int, test_ids: Sequence[int], train_ids: Sequence[int],
                    scores) -> float:
        """Store one chunk of scores (rows = test_ids, columns = all of the run's train_ids by position)
        and its progress marker in one transaction; returns the seconds spent. A chunk already stored
        is skipped.

        Every score of a run passes through here: one blob per test example plus its ranked extremes and
        the training examples' running aggregates (score_layout.py), instead of one row per score, and the
        foreign-key lookups replaced by one check that the ids are this run's examples.
        """
        started = time.perf_counter()
        values = np.asarray(scores, dtype=np.float64)
        if values.shape != (len(test_ids), len(train_ids)):
            raise InfluenceStoreError(f"chunk {chunk_index} of run {run_id}: scores have shape {values.shape}, "
                                      f"expected ({len(test_ids)}, {len(train_ids)})")
        if not np.isfinite(values).all():
            raise InfluenceStoreError(f"chunk {chunk_index} of run {run_id} has NaN or infinite scores, so none "
                                      f"were stored; the inverse-HVP is unstable: increase damping")
        self._check_chunk_ids(run_id, test_ids, train_ids)
        # The driver's own connection writes the blocks (score_layout.py); the ids were checked above, so
        # SQLite's foreign-key lookups are off for this transaction.
        with self._write_without_foreign_keys() as connection:
            exists = connection.execute(select(RunChunk.chunk_index).where(
                RunChunk.run_id == run_id, RunChunk.chunk_index == chunk_index)).first()
            if exists is None:
                insert = score_layout.insert_sqlite if self.is_sqlite else score_layout.insert_postgresql
                insert(connection.connection.driver_connection, run_id, test_ids, train_ids, values)
                connection.execute(RunChunk.__table__.insert(), {
                    "run_id": run_id, "chunk_index": chunk_index, "finished_utc": utcnow()})
                seconds = time.perf_counter() - started
                connection.execute(update(Run).where(Run.id == run_id).values(
                    chunks_done=Run.chunks_done + 1, seconds_writing=Run.seconds_writing + seconds))
        return time.perf_counter() - started

    def _check_chunk_ids(self, run_id: int, test_ids: Sequence[int], train_ids: Sequence[int]) -> None:
        """What the foreign keys would catch, and more: test ids are this run's, once each; train ids are
        all of the run's training examples in position order (the layout of a score block)."""
        if run_id not in self._run_example_ids:  # a run's examples never change: read them once
            with self.reader.connect() as connection:
                rows = connection.execute(select(RunExample.split, RunExample.example_id).where(
                    RunExample.run_id == run_id).order_by(RunExample.split, RunExample.position)).all()
            if not rows:
                raise InfluenceStoreError(f"no run {run_id} with examples in {self.location!r}")
            self._run_example_ids[run_id] = {"test": {e for s, e in rows if s == "test"},
                                             "train": [e for s, e in rows if s == "train"]}
        known = self._run_example_ids[run_id]
        if len(set(test_ids)) != len(test_ids) or not set(test_ids) <= known["test"]:
            raise InfluenceStoreError(f"chunk of run {run_id}: test example ids repeat or are not the run's "
                                      f"test examples")
        if [int(j) for j in train_ids] != known["train"]:
            raise InfluenceStoreError(f"chunk of run {run_id}: train example ids repeat or are not the run's "
                                      f"train examples (all of them, in position order)")

    # -- reading scores -----------------------------------------------------------------------------

    def _blocks(self, connection, run_id: int,
                test_ids: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(test example id, scores by training position) for the stored test examples, by test position."""
        query = (select(ScoreBlock.test_example_id, ScoreBlock.encoding, ScoreBlock.scores)
                 .join(RunExample, (RunExample.run_id == ScoreBlock.run_id) & (RunExample.split == "test")
                       & (RunExample.example_id == ScoreBlock.test_example_id))
                 .where(ScoreBlock.run_id == run_id).order_by(RunExample.position))
        if test_ids is not None:
            query = query.where(ScoreBlock.test_example_id.in_(list(test_ids)))
        for test_id, encoding, blob in connection.execute(query):
            yield test_id, score_layout.decode(encoding, blob)

    def score_rows(self, run_id: int, test_example_id: int) -> list[tuple[int, float]]:
        """(train example id, score) for one test example, all training examples."""
        train_ids = self.example_ids(run_id, "train")
        with self.reader.connect() as connection:
            rows = [row for _, row in self._blocks(connection, run_id, [test_example_id])]
        return [(j, v) for row in rows for j, v in zip(train_ids, row.tolist())]

    def score_matrix(self, run_id: int) -> np.ndarray:
        """Every stored score of a run, [n_test, n_train] by position; NaN rows for test examples not stored yet."""
        test_position = {e: i for i, e in enumerate(self.example_ids(run_id, "test"))}
        matrix = np.full((len(test_position), len(self.example_ids(run_id, "train"))), np.nan)
        with self.reader.connect() as connection:
            for test_id, row in self._blocks(connection, run_id):
                matrix[test_position[test_id]] = row
        return matrix

    def top_scores(self, run_id: int, test_key: str, k: int) -> dict[str, list[dict]]:
        """Most helpful (largest) and most harmful (most negative) training examples for one test example."""
        test_id = self.test_example_id(run_id, test_key)
        train_ids = self.example_ids(run_id, "train")
        with self.reader.connect() as connection:
            rows = [row for _, row in self._blocks(connection, run_id, [test_id])]
        groups: dict[str, list[dict]] = {side: [] for side in score_layout.SIDES}
        if rows:  # nothing stored yet for this test example: empty sides
            scores = rows[0]
            for side, positions in score_layout.ranked(scores, k).items():
                groups[side] = [{"example_id": train_ids[p], "score": float(scores[p])} for p in positions]
        return self._with_examples(run_id, groups)

    def most_hurt_tests(self, run_id: int, train_example_ids: Sequence[int], k: int) -> dict[int, list[dict]]:
        """Per training example, the ``k`` test examples it hurts most (most negative scores), ties to the
        earlier test position; one read of the run's score blocks."""
        ids = list(dict.fromkeys(int(i) for i in train_example_ids))
        if not ids or k < 1:
            return {i: [] for i in ids}
        train_position = {e: i for i, e in enumerate(self.example_ids(run_id, "train"))}
        test_ids = self.example_ids(run_id, "test")
        matrix = self.score_matrix(run_id)
        tests = self.run_examples(run_id, "test")
        out: dict[int, list[dict]] = {}
        for train_id in ids:
            column = matrix[:, train_position[train_id]] if train_id in train_position else np.empty(0)
            stored = np.flatnonzero(~np.isnan(column))
            order = stored[np.argsort(column[stored], kind="stable")][:k]
            out[train_id] = [{"example_id": test_ids[p], "score": float(column[p])} for p in order]
        examples = self.examples({row["example_id"] for rows in out.values() for row in rows})
        for rows in out.values():
            for row in rows:
                example = examples[row["example_id"]]
                loss = tests.get(row["example_id"], {}).get("loss")
                row.update(key=example["key"], label=example["label"], loss=loss)
        return out

    def aggregate_scores(self, run_id: int) -> list[dict]:
        """Per training example, over the run's test set: sum, mean, min, max and how many test examples it hurts."""
        with self._session(read=True) as s:
            run = self._get_run(s, run_id)
            rows = s.execute(select(TrainAggregate).where(TrainAggregate.run_id == run.id)
                             .order_by(TrainAggregate.train_example_id)).scalars().all()
            n_train = run.n_train
            return [{"example_id": r.train_example_id, "sum": r.sum_score, "mean": r.sum_score / r.n_test,
                     "min": r.min_score, "max": r.max_score, "hurts": r.hurts,
                     "predicted_loss_change": r.sum_score / r.n_test / n_train} for r in rows]

    def top_aggregate(self, run_id: int, k: int, by: str = "sum") -> dict[str, list[dict]]:
        rows = self.aggregate_scores(run_id)
        rows.sort(key=lambda r: r[by])
        return self._with_examples(run_id, {"helpful": rows[::-1][:k], "harmful": rows[:k]})

    def score_values(self, run_id: int, limit: int = 2_000_000) -> list[float]:
        """Score values of a run (at most ``limit``, from the first test examples), for distributions."""
        values: list[float] = []
        with self.reader.connect() as connection:
            for _, row in self._blocks(connection, run_id):
                if len(values) >= limit:
                    break
                values.extend(row[:limit - len(values)].tolist())
        return values
