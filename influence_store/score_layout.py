"""How a run's scores lie in the store, and the SQL that writes and ranks them (the store's score half).

A run's scores form an [n_test, n_train] matrix. Each test example's row is one ``score_blocks`` row:
the scores against every training example, in the run's training positions (``run_examples.position``),
as little-endian float32 when that is exact (a model computed in float32) and float64 otherwise. That is
4 or 8 bytes per score, written in bulk, read back bit for bit. So that plain SQL can still rank scores,
every chunk also stores, from the same numbers and in the same transaction:

- ``score_extremes``: per test example its EXTREMES_PER_SIDE most helpful and most harmful training
  examples (``side``, ``rank`` 1..k, ties by training position);
- ``train_aggregates``: per training example, the running ``n_test``, ``sum_score``, ``min_score``,
  ``max_score`` and ``hurts`` (how many test examples it has a negative score for).

docs/store.md shows the plain-SQL queries. Ranking here (``smallest``) and in ``score_extremes`` is the
same function, so ``Store.top_scores`` (which reads the block, for any k) and the SQL agree.
"""

from __future__ import annotations

import sqlite3
from typing import Sequence

import numpy as np

EXTREMES_PER_SIDE = 100
SIDES = ("helpful", "harmful")


def encode(values: np.ndarray) -> tuple[str, list[bytes]]:
    """A chunk's rows as blobs: float32 when every value survives the round trip exactly, else float64."""
    with np.errstate(over="ignore"):  # a value beyond float32's range simply is not exact in it
        narrow = values.astype("<f4")
    if np.array_equal(narrow.astype(np.float64), values):
        return "<f4", [row.tobytes() for row in narrow]
    wide = values.astype("<f8", copy=False)
    return "<f8", [row.tobytes() for row in wide]


def decode(encoding: str, blob: bytes) -> np.ndarray:
    """One stored row back as float64 (exactly the computed values)."""
    if encoding not in ("<f4", "<f8"):
        raise ValueError(f"unknown score encoding {encoding!r}")
    return np.frombuffer(blob, dtype=encoding).astype(np.float64)


def smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest keys, ties by position: a stable partial sort in O(n)."""
    n = len(keys)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        kth = np.partition(keys, k - 1)[k - 1]
        candidates = np.flatnonzero(keys <= kth)
    else:
        candidates = np.arange(n)
    return candidates[np.argsort(keys[candidates], kind="stable")][:k]


def ranked(row: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Positions of the k most helpful (largest) and most harmful (most negative) scores of one row."""
    return {"helpful": smallest(-row, k), "harmful": smallest(row, k)}


def extreme_rows(run_id: int, test_ids: Sequence[int], train_ids: Sequence[int], values: np.ndarray,
                 k: int = EXTREMES_PER_SIDE) -> list[tuple]:
    """(run, test example, side, rank, train example, score) rows for ``score_extremes``."""
    train = np.asarray(train_ids, dtype=np.int64)
    rows = []
    for test_id, row in zip(test_ids, values):
        for side, positions in ranked(row, k).items():
            rows.extend(zip([run_id] * len(positions), [int(test_id)] * len(positions), [side] * len(positions),
                            range(1, len(positions) + 1), train[positions].tolist(), row[positions].tolist()))
    return rows


def aggregate_rows(run_id: int, train_ids: Sequence[int], values: np.ndarray) -> list[tuple]:
    """(run, train example, n_test, sum, min, max, hurts) of one chunk, to add to ``train_aggregates``."""
    columns = (values.sum(axis=0), values.min(axis=0), values.max(axis=0), (values < 0).sum(axis=0))
    n = len(values)
    return list(zip([run_id] * len(train_ids), [int(j) for j in train_ids], [n] * len(train_ids),
                    *(c.tolist() for c in columns)))


AGGREGATE_COLUMNS = "run_id, train_example_id, n_test, sum_score, min_score, max_score, hurts"
EXTREME_COLUMNS = "run_id, test_example_id, side, rank, train_example_id, score"


def _upsert_aggregates(source: str, least: str, greatest: str) -> str:
    return (f"INSERT INTO train_aggregates ({AGGREGATE_COLUMNS}) {source} "
            f"ON CONFLICT (run_id, train_example_id) DO UPDATE SET "
            f"n_test = train_aggregates.n_test + excluded.n_test, "
            f"sum_score = train_aggregates.sum_score + excluded.sum_score, "
            f"min_score = {least}(train_aggregates.min_score, excluded.min_score), "
            f"max_score = {greatest}(train_aggregates.max_score, excluded.max_score), "
            f"hurts = train_aggregates.hurts + excluded.hurts")


def insert_sqlite(raw: sqlite3.Connection, run_id: int, test_ids: Sequence[int], train_ids: Sequence[int],
                  values: np.ndarray) -> None:
    """Write one chunk through the sqlite3 connection (inside the caller's transaction).

    A few hundred rows per chunk instead of one per score; sqlite3 releases the GIL while SQLite works,
    so the writer thread barely competes with the computation."""
    encoding, blobs = encode(values)
    raw.executemany("INSERT INTO score_blocks (run_id, test_example_id, encoding, scores) VALUES (?, ?, ?, ?)",
                    zip([run_id] * len(blobs), [int(t) for t in test_ids], [encoding] * len(blobs), blobs))
    raw.executemany(f"INSERT INTO score_extremes ({EXTREME_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    extreme_rows(run_id, test_ids, train_ids, values))
    raw.executemany(_upsert_aggregates("VALUES (?, ?, ?, ?, ?, ?, ?)", "min", "max"),
                    aggregate_rows(run_id, train_ids, values))


def insert_postgresql(raw, run_id: int, test_ids: Sequence[int], train_ids: Sequence[int],
                      values: np.ndarray) -> None:
    """Write one chunk through a psycopg 3 connection with binary ``COPY`` (inside the caller's transaction)."""
    encoding, blobs = encode(values)
    with raw.cursor() as cursor:
        with cursor.copy("COPY score_blocks (run_id, test_example_id, encoding, scores) FROM STDIN "
                         "(FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "varchar", "bytea"])
            for test_id, blob in zip(test_ids, blobs):
                copy.write_row((run_id, int(test_id), encoding, blob))
        with cursor.copy(f"COPY score_extremes ({EXTREME_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "varchar", "int4", "int4", "float8"])
            for row in extreme_rows(run_id, test_ids, train_ids, values):
                copy.write_row(row)
        cursor.execute("CREATE TEMPORARY TABLE IF NOT EXISTS chunk_aggregates (run_id int4, train_example_id int4, "
                       "n_test int4, sum_score float8, min_score float8, max_score float8, hurts int4) "
                       "ON COMMIT DELETE ROWS")
        with cursor.copy(f"COPY chunk_aggregates ({AGGREGATE_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "int4", "float8", "float8", "float8", "int4"])
            for row in aggregate_rows(run_id, train_ids, values):
                copy.write_row(row)
        cursor.execute(_upsert_aggregates(f"SELECT {AGGREGATE_COLUMNS} FROM chunk_aggregates", "LEAST", "GREATEST"))
