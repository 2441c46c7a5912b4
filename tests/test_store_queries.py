"""The plain-SQL queries documented in docs/store.md answer what `influence-store scores` answers, and the
ranked rows and aggregates the store keeps agree with every stored score (checked with numpy here)."""

import json
import re
import sqlite3
from contextlib import closing
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
from stored import connect_with_scores
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
    result = CliRunner().invoke(cli, ["--db", str(path), "scores", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
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


# ---------- the bundled example answers as it did with one row per score ----------

@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    db = tmp_path_factory.mktemp("bundled") / "store.db"
    spec = str(Path(__file__).resolve().parent.parent / "examples" / "digits_noisy.py") + ":task"
    result = CliRunner().invoke(cli, ["--db", str(db), "run", spec, "-a", "exact", "-o", "damping", "0.001",
                                      "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return db


def test_scores_and_propose_answer_as_with_one_row_per_score(bundled):
    """The SQL the row-per-score store ran, over one row per score (decoded once from the blocks)."""
    db = bundled
    with closing(connect_with_scores(db)) as rows_layout:
        def old_sql(_, query, *params):
            return rows_layout.execute(query, params).fetchall()

        check_answers(db, old_sql)


def check_answers(db, old_sql):
    test_keys = [k for (k,) in old_sql(db, "SELECT e.key FROM run_examples r JOIN examples e ON e.id = r.example_id "
                                           "WHERE r.run_id = 1 AND r.split = 'test' ORDER BY r.position")]
    for key in test_keys[::150]:
        shown = cli_json(db, 1, "--test", key, "--top", 10)
        for side, order in (("helpful", "DESC"), ("harmful", "ASC")):
            before = old_sql(db, f"SELECT e.key, s.score FROM scores s JOIN examples e ON e.id = s.train_example_id "
                                 f"JOIN examples t ON t.id = s.test_example_id WHERE s.run_id = 1 AND t.key = ? "
                                 f"ORDER BY s.score {order} LIMIT 10", key)
            assert [(r["key"], r["score"]) for r in shown[side]] == before
    rows = old_sql(db, "SELECT e.key, SUM(s.score), AVG(s.score), SUM(s.score < 0) FROM scores s JOIN examples e "
                       "ON e.id = s.train_example_id WHERE s.run_id = 1 GROUP BY s.train_example_id "
                       "ORDER BY s.train_example_id")
    by_sum = sorted(rows, key=lambda r: r[1])
    shown = cli_json(db, 1, "--top", 10)
    for side, expected in (("harmful", by_sum[:10]), ("helpful", by_sum[::-1][:10])):
        assert [r["key"] for r in shown[side]] == [r[0] for r in expected]
        assert [r["hurts"] for r in shown[side]] == [r[3] for r in expected]
        assert [r["sum"] for r in shown[side]] == pytest.approx([r[1] for r in expected], rel=1e-12)
        assert [r["mean"] for r in shown[side]] == pytest.approx([r[2] for r in expected], rel=1e-12)
    proposed = CliRunner().invoke(cli, ["--db", str(db), "propose", "1", "--rule", "harmful", "--top", "10", "--json"])
    assert proposed.exit_code == 0, proposed.output
    assert [p["key"] for p in json.loads(proposed.output)] == [r[0] for r in by_sum[:10]]
