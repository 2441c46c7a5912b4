"""Read a store's scores with plain sqlite3 and numpy, as docs/store.md describes the layout (not via Store)."""

import re
import sqlite3
from contextlib import closing

import numpy as np


def connect_with_scores(path) -> sqlite3.Connection:
    """A sqlite3 connection to the store with a TEMP table ``scores (run_id, test_example_id,
    train_example_id, score)``: one row per score, decoded from ``score_blocks``."""
    connection = sqlite3.connect(str(path))
    connection.execute("CREATE TEMP TABLE scores (run_id INTEGER, test_example_id INTEGER, "
                       "train_example_id INTEGER, score REAL, PRIMARY KEY (run_id, test_example_id, train_example_id))")
    train = {}
    for run_id, example_id in connection.execute(
            "SELECT run_id, example_id FROM run_examples WHERE split = 'train' ORDER BY run_id, position"):
        train.setdefault(run_id, []).append(example_id)
    for run_id, test_id, encoding, blob in connection.execute(
            "SELECT run_id, test_example_id, encoding, scores FROM main.score_blocks").fetchall():
        values = np.frombuffer(blob, dtype={"<f4": "<f4", "<f8": "<f8"}[encoding]).astype(np.float64)
        assert len(values) == len(train[run_id])
        connection.executemany("INSERT INTO temp.scores VALUES (?, ?, ?, ?)",
                               [(run_id, test_id, j, v) for j, v in zip(train[run_id], values.tolist())])
    return connection


def sql(path, query: str, *params) -> list[tuple]:
    """Run one query on the store; a query that names the ``scores`` table sees one row per score."""
    connect = connect_with_scores if re.search(r"\bscores\b", query) else sqlite3.connect
    with closing(connect(str(path))) as connection:
        return connection.execute(query, params).fetchall()


def copy_store(source, target):
    """A private copy of a store: sqlite's backup API, a consistent snapshot even in WAL mode."""
    with closing(sqlite3.connect(str(source))) as src, closing(sqlite3.connect(str(target))) as dst:
        src.backup(dst)
    return target
