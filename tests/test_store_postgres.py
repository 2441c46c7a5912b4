"""The score layout on PostgreSQL (written with COPY): every score back bit for bit, and the same blocks,
ranked extremes and aggregates as SQLite for the same chunks. Needs a server: set
INFLUENCE_STORE_TEST_POSTGRES to a SQLAlchemy URL (postgresql+psycopg://...); skipped otherwise."""

import os
import uuid

import numpy as np
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from influence_store.errors import InfluenceStoreError
from influence_store.store import Store

URL = os.environ.get("INFLUENCE_STORE_TEST_POSTGRES")
pytestmark = pytest.mark.skipif(not URL, reason="INFLUENCE_STORE_TEST_POSTGRES is not set")


@pytest.fixture
def postgres_url():
    """A private database on the test server, dropped afterwards (other tests may share the server)."""
    name = f"influence_store_{uuid.uuid4().hex[:12]}"
    admin = create_engine(URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


def make_run(store, n_train, n_test):
    settings = {"approximator": "exact", "options": {}, "freeze": "all", "freeze_options": {},
                "tracked_fingerprint": "t", "num_params": 1, "seed": 0, "effective_damping": 0.0,
                "sign_convention": "s", "versions": {}, "device": "cpu"}
    run_id = store.create_run(
        version_name="v", weights_sha256="w", train_dataset="d", test_dataset="d/test",
        train_rows=[(f"tr{i}", f"h{i}", None, {}) for i in range(n_train)],
        test_rows=[(f"te{i}", f"g{i}", None, {}) for i in range(n_test)], train_losses=[0.0] * n_train,
        test_losses=[0.0] * n_test, task_spec="t", task_options={}, settings=settings,
        settings_fingerprint="f", chunks_total=2)
    return run_id, store.example_ids(run_id, "train"), store.example_ids(run_id, "test")


def table(store, query):
    with store.engine.connect() as connection:
        return sorted(tuple(r) for r in connection.exec_driver_sql(query))


def test_postgres_stores_the_same_layout_as_sqlite(postgres_url, tmp_path):
    rng = np.random.default_rng(0)
    n_train, n_test = 250, 9
    wide = rng.integers(0, 2 ** 63 - 1, (n_test, n_train), dtype=np.int64).view(np.float64)
    wide[~np.isfinite(wide)] = 0.5
    wide *= np.where(np.arange(n_train) % 2, 1.0, -1.0)
    wide[0, :3] = [5e-324, -1.7976931348623157e308, 0.0]
    narrow = rng.standard_normal((n_test, n_train)).astype(np.float32).astype(np.float64)
    stores = {"postgresql": Store(postgres_url), "sqlite": Store(str(tmp_path / "s.db"))}
    assert not stores["postgresql"].is_sqlite
    for store in stores.values():
        run_id, train_ids, test_ids = make_run(store, n_train, n_test)
        store.write_chunk(run_id, 0, test_ids[:5], train_ids, wide[:5])
        store.write_chunk(run_id, 1, test_ids[5:], train_ids, narrow[5:])
        store.write_chunk(run_id, 1, test_ids[5:], train_ids, narrow[5:] + 1)  # stored already: skipped
        expected = np.concatenate([wide[:5], narrow[5:]])
        matrix = store.score_matrix(run_id)
        assert np.array_equal(matrix.view(np.int64), expected.view(np.int64))
        assert store.run(run_id)["chunks_done"] == 2
    pg, lite = stores["postgresql"], stores["sqlite"]
    for query in ("SELECT run_id, test_example_id, encoding, scores FROM score_blocks",
                  "SELECT * FROM score_extremes", "SELECT * FROM train_aggregates"):
        assert [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in table(pg, query)] == \
            table(lite, query), query
    assert pg.top_scores(1, "te3", 7) == lite.top_scores(1, "te3", 7)
    assert pg.aggregate_scores(1) == lite.aggregate_scores(1)
    assert pg.score_values(1, limit=1000) == lite.score_values(1, limit=1000)


def test_a_chunk_is_refused_whole_when_the_runs_aggregates_were_damaged(postgres_url):
    """Later chunks update every training example's aggregate row: a missing row stops the chunk whole."""
    store = Store(postgres_url)
    run_id, train_ids, test_ids = make_run(store, 20, 4)
    scores = np.random.default_rng(1).standard_normal((4, 20))
    store.write_chunk(run_id, 0, test_ids[:2], train_ids, scores[:2])
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM train_aggregates WHERE train_example_id = {train_ids[3]}")
    with pytest.raises(InfluenceStoreError, match="19 of its 20 train_aggregates rows"):
        store.write_chunk(run_id, 1, test_ids[2:], train_ids, scores[2:])
    assert store.run(run_id)["chunks_done"] == 1
    assert table(store, f"SELECT count(*) FROM score_blocks WHERE run_id = {run_id}") == [(2,)]
    assert table(store, f"SELECT sum(n_test) FROM train_aggregates WHERE run_id = {run_id}") == [(38,)]
