"""Alembic history of the store: blank -> head, every earlier revision -> head with its data kept,
models match migrations, one linear history."""

import sqlite3
from contextlib import closing
from importlib import resources

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from influence_store.errors import InfluenceStoreError
from influence_store.schema import Base
from influence_store.store import Store
from stored import connect_with_scores


def alembic_config(connection=None) -> Config:
    """Built here, not borrowed from the store, so the test checks what ships in the package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("influence_store.migrations")))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


SCRIPTS = ScriptDirectory.from_config(alembic_config())
HEAD = SCRIPTS.get_current_head()
OLDEST_FIRST = [rev.revision for rev in reversed(list(SCRIPTS.walk_revisions()))]

# Rows written with raw SQL at the revision that introduced their tables. A new revision that changes
# one of these tables must keep this data readable (and may add its own rows here).
ROWS_AT = {
    "0001": [
        "INSERT INTO datasets (id, name, created_utc) VALUES (1, 'train-set', '2026-01-01T00:00:00+00:00'), "
        "(2, 'train-set/test', '2026-01-01T00:00:00+00:00')",
        "INSERT INTO examples (id, dataset_id, key, content_hash, label_json, payload_json) VALUES "
        "(1, 1, 'tr-a', 'ha', '0', '{\"x\": 1}'), (2, 1, 'tr-b', 'hb', '1', '{\"x\": 2}'), "
        "(3, 2, 'te-a', 'hc', '1', '{\"x\": 3}')",
        "INSERT INTO model_versions (id, name, parent_id, checkpoint_path, checkpoint_sha256, weights_sha256, "
        "dataset_id, created_utc, notes) VALUES (1, 'v1', NULL, NULL, NULL, 'w1', 1, '2026-01-01T00:00:00+00:00', "
        "'first')",
        "INSERT INTO runs (id, model_version_id, train_dataset_id, test_dataset_id, task_spec, task_options_json, "
        "approximator, options_json, freeze, freeze_options_json, tracked_fingerprint, num_params, seed, "
        "effective_damping, sign_convention, versions_json, device, settings_json, settings_fingerprint, status, "
        "n_train, n_test, chunks_total, chunks_done, created_utc, started_utc, finished_utc, seconds_total, "
        "seconds_writing, error, diagnostics_json) VALUES (1, 1, 1, 2, 'task.py:task', '{}', 'exact', "
        "'{\"damping\": 0.001}', 'all', '{}', 'fp', 31, 0, 0.001, 'positive = helpful', '{\"torch\": \"2\"}', "
        "'cpu', '{}', 'settings-fp', 'done', 2, 1, 1, 1, '2026-01-01T00:00:00+00:00', "
        "'2026-01-01T00:00:00+00:00', '2026-01-01T00:00:01+00:00', 1.5, 0.25, NULL, '{}')",
        "INSERT INTO run_examples (run_id, split, position, example_id, loss, self_influence) VALUES "
        "(1, 'train', 0, 1, 0.5, 2.0), (1, 'train', 1, 2, 0.25, 3.0), (1, 'test', 0, 3, 0.75, NULL)",
        "INSERT INTO run_chunks (run_id, chunk_index, finished_utc) VALUES (1, 0, '2026-01-01T00:00:01+00:00')",
        "INSERT INTO scores (run_id, test_example_id, train_example_id, score) VALUES "
        "(1, 3, 1, 0.1000000000000000055511151231257827), (1, 3, 2, -2.5e-300)",
    ],
    "0002": [
        "INSERT INTO proposals (id, run_id, example_id, rule, rule_options_json, rank, evidence_json, status, "
        "reviewer, note, applied_version_id, created_utc, updated_utc) VALUES (1, 1, 2, 'harmful', '{}', 1, "
        "'{\"score\": -2.5e-300}', 'accepted', 'ann', 'mislabeled', NULL, '2026-01-02T00:00:00+00:00', "
        "'2026-01-02T00:00:00+00:00')",
        "INSERT INTO proposal_events (id, proposal_id, from_status, to_status, actor, note, created_utc) VALUES "
        "(1, 1, 'proposed', 'accepted', 'ann', 'mislabeled', '2026-01-02T00:00:00+00:00')",
    ],
    "0006_proposal_relabel": [
        "INSERT INTO proposals (id, run_id, example_id, rule, rule_options_json, rank, evidence_json, status, "
        "reviewer, note, applied_version_id, created_utc, updated_utc, new_label_json) VALUES (2, 1, 1, 'harmful', "
        "'{}', 2, '{\"score\": 0.1}', 'accepted', 'bo', 'wrong label', NULL, '2026-01-03T00:00:00+00:00', "
        "'2026-01-03T00:00:00+00:00', '3')",
    ],
    "0005_block_claims": [
        "INSERT INTO run_claims (run_id, block, owner, lease_expires, claims, finished_utc) VALUES "
        "(1, 0, 'host:12:ab', 1764547200.5, 2, '2026-01-01T00:00:01+00:00'), (1, -1, NULL, 0.0, 0, NULL)",
    ],
}


def upgrade(path, revision: str) -> None:
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
    engine.dispose()


def table_rows(path) -> dict[str, list[tuple]]:
    """Every row of every table (sorted), read with plain sqlite3."""
    with sqlite3.connect(path) as connection:
        tables = [t for (t,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version'")]
        return {t: sorted(connection.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def scores_from_blocks(path) -> list[tuple]:
    """The rows the old ``scores`` table held, decoded from ``score_blocks`` (docs/store.md)."""
    with closing(connect_with_scores(path)) as connection:
        return sorted(connection.execute("SELECT * FROM temp.scores").fetchall(), key=repr)


MOVED = {"scores": scores_from_blocks}  # tables a later revision replaced -> how to read their rows back


def test_history_is_linear_with_exactly_one_head():
    assert SCRIPTS.get_heads() == [HEAD]
    assert SCRIPTS.get_bases() == [OLDEST_FIRST[0]]
    for rev in SCRIPTS.walk_revisions():
        assert not isinstance(rev.down_revision, (tuple, list)), f"{rev.revision} is a merge revision"
        assert not rev.branch_labels


def test_a_store_at_the_head_opens_without_alembic(tmp_path):
    """The head is read from the migration files (store_file.head_revision, checked against Alembic's in
    test_hardening_store.py), so opening a store already at it imports no Alembic."""
    import subprocess
    import sys

    Store(str(tmp_path / "at-head.db"))
    probe = ("import sys; from influence_store.store import Store; store = Store(sys.argv[1]); "
             "print(store.revision(), 'alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "at-head.db")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [HEAD, "False"]


def test_blank_database_upgrades_to_head(tmp_path):
    store = Store(str(tmp_path / "blank.db"))
    assert store.revision() == HEAD
    with sqlite3.connect(tmp_path / "blank.db") as connection:
        tables = {t for (t,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    with store.engine.connect() as connection:  # the store's own connections enforce foreign keys
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_models_match_migrations(tmp_path):
    """Autogenerate finds nothing to do: schema.py and the revisions describe the same tables."""
    upgrade(tmp_path / "head.db", "head")  # by the migrations (a new Store is built from schema.py)
    engine = create_engine(f"sqlite:///{tmp_path / 'head.db'}")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def schema_of(url: str) -> dict:
    """Every table's columns (in order, with types, nullability, defaults), keys, indexes and checks."""
    from sqlalchemy import inspect

    engine = create_engine(url)
    found = inspect(engine)
    described = {}
    for table in sorted(found.get_table_names()):
        described[table] = (
            [(c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in found.get_columns(table)],
            found.get_pk_constraint(table),
            sorted(map(repr, found.get_foreign_keys(table))),
            sorted(map(repr, found.get_indexes(table))),
            sorted(map(repr, found.get_unique_constraints(table))),
            sorted(map(repr, found.get_check_constraints(table))),
        )
    engine.dispose()
    return described


def test_a_new_store_has_the_schema_the_migrations_build(tmp_path):
    """A new store is created from schema.py and stamped at the head; migrating a blank database gives the
    same tables, column order, keys, indexes and checks. Then both migrate down and up again."""
    Store(str(tmp_path / "new.db"))
    upgrade(tmp_path / "migrated.db", "head")
    new, migrated = f"sqlite:///{tmp_path / 'new.db'}", f"sqlite:///{tmp_path / 'migrated.db'}"
    assert schema_of(new) == schema_of(migrated)
    with sqlite3.connect(tmp_path / "new.db") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    store = Store(str(tmp_path / "new.db"))
    store.downgrade(OLDEST_FIRST[0])
    store.upgrade()
    assert store.revision() == HEAD and schema_of(new) == schema_of(migrated)


@pytest.mark.parametrize("revision", [r for r in OLDEST_FIRST if r != HEAD])
def test_earlier_revision_upgrades_to_head_keeping_its_data(tmp_path, revision):
    """Rows written at 0001 (and at each later revision up to ``revision``) survive the upgrade bit for bit
    and are readable through the store's verbs."""
    path = tmp_path / f"at-{revision}.db"
    for rev in OLDEST_FIRST[:OLDEST_FIRST.index(revision) + 1]:
        upgrade(path, rev)
        with sqlite3.connect(path) as connection:
            for statement in ROWS_AT.get(rev, []):
                connection.execute(statement)
    before = table_rows(path)

    store = Store(str(path))  # migrate on open

    assert store.revision() == HEAD
    after = table_rows(path)
    for table, rows in before.items():  # later revisions may append columns: the old ones keep their values
        width = len(rows[0]) if rows else 0
        if table in MOVED:  # its rows live on in another layout: read them back through it
            assert MOVED[table](path) == rows, f"rows of {table} changed in the upgrade from {revision}"
        else:
            assert [r[:width] for r in after[table]] == rows, f"rows of {table} changed in the upgrade from {revision}"
    run = store.run(1)
    assert (run["status"], run["approximator"], run["options"], run["model_version"]) == (
        "done", "exact", {"damping": 0.001}, "v1")
    assert store.version("v1")["notes"] == "first"
    top = store.top_scores(1, "te-a", 2)
    assert [(r["key"], r["score"]) for r in top["helpful"]] == [("tr-a", 0.1), ("tr-b", -2.5e-300)]
    assert [r["key"] for r in store.self_influence(1)] == ["tr-b", "tr-a"]
    reached = OLDEST_FIRST[:OLDEST_FIRST.index(revision) + 1]
    if "0002" in reached:
        found = store.proposals()
        assert [(p["status"], p["reviewer"], p["outcome"]) for p in found][:1] == [("accepted", "ann", "remove")]
        assert store.verifications() == [] and store.proposal_events(1)[0]["new_label"] is None
    if "0006_proposal_relabel" in reached:
        assert [(p["outcome"], p["new_label"]) for p in store.proposals()][1:] == [("relabel", 3)]
    aggregates = {r["example_id"]: r for r in store.aggregate_scores(1)}
    assert (aggregates[1]["sum"], aggregates[1]["hurts"], aggregates[2]["min"]) == (0.1, 0, -2.5e-300)
    with sqlite3.connect(path) as connection:  # the ranked rows plain SQL reads agree with the blocks
        assert connection.execute("SELECT side, rank, train_example_id, score FROM score_extremes WHERE run_id = 1 "
                                  "ORDER BY side, rank").fetchall() == [
            ("harmful", 1, 2, -2.5e-300), ("harmful", 2, 1, 0.1), ("helpful", 1, 1, 0.1), ("helpful", 2, 2, -2.5e-300)]


def test_upgrade_refuses_scores_missing_from_a_test_row_and_keeps_them(tmp_path):
    """A test example whose row of scores is incomplete cannot become a block: the upgrade stops, nothing lost."""
    path = tmp_path / "partial.db"
    upgrade(path, "0002")
    with sqlite3.connect(path) as connection:
        for statement in ROWS_AT["0001"]:
            connection.execute(statement)
        connection.execute("DELETE FROM scores WHERE train_example_id = 2")
    before = table_rows(path)
    with pytest.raises(InfluenceStoreError, match="run 1, test example 3: scores for some training examples"):
        Store(str(path))
    assert table_rows(path) == before
