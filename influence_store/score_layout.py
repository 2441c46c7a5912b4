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
from typing import Iterator, Sequence

import numpy as np

from .errors import InfluenceStoreError

EXTREMES_PER_SIDE = 100
SIDES = ("helpful", "harmful")


def encode(values: np.ndarray) -> tuple[str, np.ndarray]:
    """A chunk's rows as stored: float32 when every value survives the round trip exactly, else float64."""
    with np.errstate(over="ignore"):  # a value beyond float32's range simply is not exact in it
        narrow = values.astype("<f4")
    if np.array_equal(narrow.astype(np.float64), values):
        return "<f4", narrow
    return "<f8", values.astype("<f8", copy=False)


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


def extreme_columns(run_id: int, test_ids: Sequence[int], train_ids: Sequence[int], values: np.ndarray,
                    k: int = EXTREMES_PER_SIDE) -> list[np.ndarray]:
    """Columns of the ``score_extremes`` rows (run, test example, side, rank, train example, score) of a chunk."""
    train = np.asarray(train_ids, dtype=np.int64)
    picked = [(test_id, side, row, positions) for test_id, row in zip(test_ids, values)
              for side, positions in ranked(row, k).items()]
    sizes = [len(p) for *_, p in picked]
    positions = np.concatenate([p for *_, p in picked]) if picked else np.empty(0, dtype=np.int64)
    return [np.full(sum(sizes), run_id, dtype=np.int64), np.repeat([int(t) for t, *_ in picked], sizes),
            np.repeat(np.array([side for _, side, *_ in picked], dtype="S7"), sizes),
            np.concatenate([np.arange(1, n + 1) for n in sizes]) if picked else np.empty(0, dtype=np.int64),
            train[positions], np.concatenate([row[p] for *_, row, p in picked]) if picked else np.empty(0)]


def aggregate_columns(run_id: int, train_ids: Sequence[int], values: np.ndarray) -> list[np.ndarray]:
    """Columns (run, train example, n_test, sum, min, max, hurts) of one chunk, to add to ``train_aggregates``."""
    n = len(train_ids)
    return [np.full(n, run_id, dtype=np.int64), np.asarray(train_ids, dtype=np.int64),
            np.full(n, len(values), dtype=np.int64), values.sum(axis=0), values.min(axis=0), values.max(axis=0),
            (values < 0).sum(axis=0)]


def _rows(columns: list[np.ndarray]) -> Iterator[tuple]:
    """Python rows for sqlite3 (ints and floats, sides as text)."""
    return zip(*(c.astype(str).tolist() if c.dtype.kind == "S" else c.tolist() for c in columns))


AGGREGATE_COLUMNS = "run_id, train_example_id, n_test, sum_score, min_score, max_score, hurts"
EXTREME_COLUMNS = "run_id, test_example_id, side, rank, train_example_id, score"


_ADD_AGGREGATES = ("n_test = {old}.n_test + {new}.n_test, sum_score = {old}.sum_score + {new}.sum_score, "
                   "min_score = {least}({old}.min_score, {new}.min_score), "
                   "max_score = {greatest}({old}.max_score, {new}.max_score), hurts = {old}.hurts + {new}.hurts")


def _upsert_aggregates(source: str, least: str, greatest: str) -> str:
    return (f"INSERT INTO train_aggregates ({AGGREGATE_COLUMNS}) {source} "
            f"ON CONFLICT (run_id, train_example_id) DO UPDATE SET "
            + _ADD_AGGREGATES.format(old="train_aggregates", new="excluded", least=least, greatest=greatest))


def insert_sqlite(raw: sqlite3.Connection, run_id: int, test_ids: Sequence[int], train_ids: Sequence[int],
                  values: np.ndarray) -> None:
    """Write one chunk through the sqlite3 connection (inside the caller's transaction).

    A few hundred rows per chunk instead of one per score; sqlite3 releases the GIL while SQLite works,
    so the writer thread barely competes with the computation."""
    encoding, matrix = encode(values)
    raw.executemany("INSERT INTO score_blocks (run_id, test_example_id, encoding, scores) VALUES (?, ?, ?, ?)",
                    zip([run_id] * len(matrix), [int(t) for t in test_ids], [encoding] * len(matrix),
                        [row.tobytes() for row in matrix]))
    raw.executemany(f"INSERT INTO score_extremes ({EXTREME_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    _rows(extreme_columns(run_id, test_ids, train_ids, values)))
    raw.executemany(_upsert_aggregates("VALUES (?, ?, ?, ?, ?, ?, ?)", "min", "max"),
                    _rows(aggregate_columns(run_id, train_ids, values)))


COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # then flags and header extension length, both 0
COPY_TRAILER = b"\xff\xff"


def copy_payload(columns: list[np.ndarray]) -> bytes:
    """PostgreSQL binary COPY data for rows whose fields each have one width (ints as int4, floats as float8,
    bytes as is), built by numpy: no Python work per row."""
    fields = [("count", ">i2")]
    for i, column in enumerate(columns):
        kind = {"i": ">i4", "f": ">f8"}.get(column.dtype.kind, column.dtype.str)
        fields += [(f"length{i}", ">i4"), (f"value{i}", kind)]
    rows = np.empty(len(columns[0]), dtype=fields)
    rows["count"] = len(columns)
    for i, column in enumerate(columns):
        rows[f"length{i}"] = rows.dtype[f"value{i}"].itemsize
        rows[f"value{i}"] = column
    return COPY_SIGNATURE + rows.tobytes() + COPY_TRAILER


def insert_postgresql(raw, run_id: int, test_ids: Sequence[int], train_ids: Sequence[int],
                      values: np.ndarray) -> None:
    """Write one chunk through a psycopg 3 connection with binary ``COPY`` (inside the caller's transaction).

    Every chunk covers all of the run's training examples, so the first chunk stored inserts every
    ``train_aggregates`` row of the run in one transaction, and each later chunk is a plain ``UPDATE``
    joined to the chunk's copied rows: cheaper than an upsert probing for conflicts row by row."""
    encoding, matrix = encode(values)
    blobs = np.ascontiguousarray(matrix).view(f"V{matrix.shape[1] * matrix.itemsize}").ravel()
    blocks = [np.full(len(blobs), run_id), np.asarray(test_ids, dtype=np.int64),
              np.full(len(blobs), encoding, dtype="S3"), blobs]
    with raw.cursor() as cursor:
        cursor.execute("SELECT to_regclass('pg_temp.chunk_aggregates') IS NOT NULL, "
                       "EXISTS (SELECT 1 FROM train_aggregates WHERE run_id = %s)", (run_id,))
        has_table, first_chunk_stored = cursor.fetchone()
        if not has_table:  # once per session (a temporary table, emptied at each commit)
            cursor.execute("CREATE TEMPORARY TABLE chunk_aggregates (run_id int4, train_example_id int4, "
                           "n_test int4, sum_score float8, min_score float8, max_score float8, hurts int4) "
                           "ON COMMIT DELETE ROWS")
        for table, names, columns in (
                ("score_blocks", "run_id, test_example_id, encoding, scores", blocks),
                ("score_extremes", EXTREME_COLUMNS, extreme_columns(run_id, test_ids, train_ids, values)),
                ("chunk_aggregates", AGGREGATE_COLUMNS, aggregate_columns(run_id, train_ids, values))):
            with cursor.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(copy_payload(columns))
        if not first_chunk_stored:  # an upsert: another process may be storing its first chunk too
            cursor.execute(_upsert_aggregates(f"SELECT {AGGREGATE_COLUMNS} FROM chunk_aggregates", "LEAST",
                                              "GREATEST"))
            return
        added = _ADD_AGGREGATES.format(old="train_aggregates", new="c", least="LEAST", greatest="GREATEST")
        cursor.execute(f"UPDATE train_aggregates SET {added} FROM chunk_aggregates c WHERE "
                       f"train_aggregates.run_id = c.run_id AND train_aggregates.train_example_id = c.train_example_id")
        if cursor.rowcount != len(train_ids):  # rows are never deleted, so this is a damaged store
            raise InfluenceStoreError(f"run {run_id} has {cursor.rowcount} of its {len(train_ids)} train_aggregates "
                                      f"rows, so this chunk was not stored; the store was changed outside "
                                      f"influence-store: restore it from a backup")
