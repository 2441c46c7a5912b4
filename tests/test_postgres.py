"""PostgreSQL as a first-class store: the same migrations, every command, the same bits as SQLite.

The whole curation loop (run, scores, propose, review, export, retrain as v2, versions add, compare,
verify, report, db status) runs through the CLI twice, once on a SQLite file and once on a real
PostgreSQL server, and every answer must be the same; the stored scores must be bit-identical. The
SQLite answers are checked against independent computations in test_curation_cli.py and test_store.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from postgres_server import postgres_url, scores_by_key  # noqa: F401  (a fixture)

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.store import Store, head_revision

TASK_FILE = '''
import json

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from tasks import L2, bce_loss, fit_logistic

import influence_store as ist


def collate(batch):
    return (torch.tensor([e["x"] for e in batch], dtype=torch.float64),
            torch.tensor([float(e["label"]) for e in batch], dtype=torch.float64))


def fit(train):
    return fit_logistic(*collate(train))


def accuracy(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) > 0).double() == y).double()


def task(train_data=None):
    x, y = load_breast_cancer(return_X_y=True)
    data = [{"id": f"bc-{i}", "x": [float(v) for v in row], "label": int(label)}
            for i, (row, label) in enumerate(zip(StandardScaler().fit_transform(x), y))]
    train, test = data[:150], data[450:490]
    if train_data:
        train = [json.loads(line) for line in open(train_data)]
    return ist.Task(model=fit(train), loss=bce_loss, train=train, test=test, l2=L2, collate=collate,
                    key=lambda e: e["id"], fit=fit, label=lambda e: e["label"], accuracy=accuracy, name="bc-pg")
'''
VOLATILE = ("_utc", "seconds", "path", "location", "url", "versions", "diagnostics", "workers", "output", "manifest",
            "task_spec", "task_options")


def ok(db, *args) -> str:
    result = CliRunner().invoke(cli, ["--db", str(db), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def stable(value):
    """A command's JSON answer without what differs between two stores by nature (times, paths, URLs)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(w in k for w in VOLATILE)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def assert_same(got, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-300), where
    else:
        assert got == expected, where


def curation_loop(db, folder: Path) -> dict:
    """Every command of the curation loop on one store; returns their JSON answers by step."""
    folder.mkdir()
    spec = f"{folder / 'bc_pg.py'}:task"
    (folder / "bc_pg.py").write_text(TASK_FILE)
    run = ["run", spec, "-a", "exact", "-o", "damping", "0.001", "--memory-budget-mb", "512", "--quiet", "--json"]
    out = {"run": json.loads(ok(db, *run, "--model-version", "v1"))}
    out["scores"] = json.loads(ok(db, "scores", 1, "--top", 5, "--json"))
    out["scores_one"] = json.loads(ok(db, "scores", 1, "--test", "bc-452", "--top", 5, "--json"))
    out["propose"] = json.loads(ok(db, "propose", 1, "--rule", "harmful", "--top", 4, "--by", "alice", "--json"))
    ids = [p["id"] for p in out["propose"]]
    ok(db, "review", "accept", *ids[:2], "--note", "label looks wrong", "--by", "alice")
    ok(db, "review", "reject", ids[2], "--by", "bob")
    out["proposals"] = json.loads(ok(db, "proposals", "list", "--json"))
    clean = folder / "clean.jsonl"
    out["export"] = json.loads(ok(db, "export", "--dataset", "bc-pg", "-o", clean, "--version", "v2", "--json"))
    out["exported"] = clean.read_text()
    out["run_v2"] = json.loads(ok(db, *run, "--train-data", clean, "--model-version", "v2"))
    checkpoint = folder / "v2.pt"
    torch.save({"weight": torch.zeros(30)}, checkpoint)  # compare checks the checkpoint by its hash
    out["versions_add"] = json.loads(ok(db, "versions", "add", "v2", "--checkpoint", checkpoint, "--json"))
    out["versions"] = json.loads(ok(db, "versions", "list", "--json"))
    out["compare"] = json.loads(ok(db, "compare", "v1", "v2", "--top", 1000, "--json"))
    out["compare"]["movers"].sort(key=lambda m: m["key"])  # equal rank changes come in the database's order
    out["verify"] = json.loads(ok(db, "verify", 1, "--task", spec, "--json"))
    out["runs"] = json.loads(ok(db, "runs", "list", "--json"))
    out["db_status"] = json.loads(ok(db, "db", "status", "--json"))["rows"]
    ok(db, "report", 1, "-o", folder / "report.html")
    out["report_size_class"] = (folder / "report.html").stat().st_size > 10_000
    return out


def test_every_command_answers_on_postgresql_as_on_sqlite(postgres_url, tmp_path):
    sqlite_db = tmp_path / "reference.db"
    expected = curation_loop(sqlite_db, tmp_path / "sqlite")
    got = curation_loop(postgres_url, tmp_path / "postgres")

    for step in expected:  # floats aggregated by the database (SUM, AVG) may differ in the last bits
        assert_same(stable(got[step]), stable(expected[step]), step)
    assert expected["compare"]["removed"] and expected["verify"]["n_removed"] == 2  # the loop did real work
    for run_id, n_train in ((1, 150), (2, 148)):
        pg, lite = scores_by_key(postgres_url, run_id), scores_by_key(str(sqlite_db), run_id)
        assert len(pg) == len(lite) == n_train * 40 and pg == lite  # bit for bit, same count
    assert Store(postgres_url).revision() == head_revision()


def test_a_postgresql_url_without_a_driver_means_psycopg(postgres_url):
    bare = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    store = Store(bare)
    assert store.engine.dialect.driver == "psycopg" and store.revision() == head_revision()


def test_two_stores_opening_a_new_database_at_once_migrate_it_once(postgres_url):
    """Dask workers open the store together: PostgreSQL's advisory lock lets one migrate, the others wait."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        revisions = list(pool.map(lambda _: Store(postgres_url).revision(), range(4)))
    assert revisions == [head_revision()] * 4


def test_a_new_store_has_the_schema_the_migrations_build_on_postgresql(postgres_url):
    """Created from schema.py at the head, then down to base and up again by Alembic's migrations: the same
    tables, column order, keys, indexes and checks."""
    from test_migrations import schema_of

    store = Store(postgres_url)
    created = schema_of(postgres_url)
    store.downgrade("base")
    store.upgrade()  # a blank schema with Alembic's version table: migrated revision by revision
    assert store.revision() == head_revision() and schema_of(postgres_url) == created
    store.engine.dispose()
