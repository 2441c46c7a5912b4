"""The plain-SQL queries documented in docs/store.md answer what `influence-store scores` answers, and the
ranked rows and aggregates the store keeps agree with every stored score (checked with numpy here)."""

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.runs import execute_run
from influence_store.score_layout import EXTREMES_PER_SIDE
from influence_store.scoring import compute_scores
from influence_store.store import Store
from tasks import small_breast_cancer_task

DOC = Path(__file__).resolve().parent.parent / "docs" / "store.md"
QUERIES = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    torch.manual_seed(0)
    task = small_breast_cancer_task()
    path = tmp_path_factory.mktemp("queries") / "store.db"
    store = Store(str(path))
    run = execute_run(store, task, approximator="exact", options={"damping": 1e-3}, test_chunk_size=7)
    reference = compute_scores(task, "exact", {"damping": 1e-3}, test_chunk_size=7).matrix().numpy()
    return path, run.run_id, reference, [str(i) for i in range(len(task.train))]


def cli_json(path, *args):
    result = CliRunner().invoke(cli, ["scores", "--db", str(path), *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    import json
    return json.loads(result.output)


def test_the_documented_queries_are_the_two_on_the_page():
    assert len(QUERIES) == 2 and "score_extremes" in QUERIES[0] and "train_aggregates" in QUERIES[1]


@pytest.mark.parametrize("test_key", ["0", "3", "29"])
def test_top_harmful_for_one_test_example_query_matches_scores(stored, test_key):
    path, run_id, reference, train_keys = stored
    assert run_id == 1  # the documented query names run 1
    with sqlite3.connect(path) as connection:
        rows = connection.execute(QUERIES[0].replace("'17'", f"'{test_key}'")).fetchall()
    listed = cli_json(path, 1, "--test", test_key, "--top", 10)["harmful"]
    assert rows == [(r["key"], r["score"]) for r in listed]
    # ... and both are the 10 most negative of the computed scores, ties by position
    row = reference[int(test_key)]
    order = sorted(range(len(row)), key=lambda i: (row[i], i))[:10]
    assert rows == [(train_keys[i], row[i]) for i in order]


def test_top_harmful_on_average_query_matches_scores(stored):
    path, _, reference, train_keys = stored
    with sqlite3.connect(path) as connection:
        rows = connection.execute(QUERIES[1]).fetchall()
    listed = cli_json(path, 1, "--top", 10)["harmful"]
    assert [(k, m, h) for k, m, h in rows] == [(r["key"], r["mean"], r["hurts"]) for r in listed]
    mean = reference.mean(axis=0)
    order = np.argsort(mean, kind="stable")[:10]
    assert [k for k, _, _ in rows] == [train_keys[i] for i in order]
    assert [m for _, m, _ in rows] == pytest.approx(mean[order].tolist(), rel=1e-12)
    assert [h for _, _, h in rows] == (reference[:, order] < 0).sum(axis=0).tolist()


def test_extremes_and_aggregates_agree_with_every_score(stored):
    path, run_id, reference, _ = stored
    store = Store(str(path))
    assert np.array_equal(store.score_matrix(run_id), reference)  # every score back exactly
    train_ids = store.example_ids(run_id, "train")
    with sqlite3.connect(path) as connection:
        for position, test_id in enumerate(store.example_ids(run_id, "test")):
            row = reference[position]
            for side, key in (("harmful", row), ("helpful", -row)):
                got = connection.execute("SELECT train_example_id, score FROM score_extremes WHERE run_id = ? AND "
                                         "test_example_id = ? AND side = ? ORDER BY rank",
                                         (run_id, test_id, side)).fetchall()
                order = sorted(range(len(row)), key=lambda i: (key[i], i))[:EXTREMES_PER_SIDE]
                assert got == [(train_ids[i], row[i]) for i in order]
        aggregates = connection.execute("SELECT train_example_id, n_test, sum_score, min_score, max_score, hurts "
                                        "FROM train_aggregates WHERE run_id = ?", (run_id,)).fetchall()
    by_id = {a[0]: a[1:] for a in aggregates}
    assert len(by_id) == len(train_ids)
    for column, j in enumerate(train_ids):
        n, total, low, high, hurts = by_id[j]
        values = reference[:, column]
        assert (n, low, high, hurts) == (len(values), values.min(), values.max(), int((values < 0).sum()))
        assert total == pytest.approx(values.sum(), rel=1e-12, abs=1e-15)


def test_top_scores_beyond_the_stored_extremes_reads_the_whole_block(stored):
    path, run_id, reference, train_keys = stored
    top = Store(str(path)).top_scores(run_id, "5", 120)
    row = reference[5]
    assert [r["key"] for r in top["helpful"]] == [train_keys[i] for i in sorted(range(120), key=lambda i: (-row[i], i))]
    assert [r["score"] for r in top["harmful"]] == sorted(row.tolist())
