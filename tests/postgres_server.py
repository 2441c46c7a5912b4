"""A fresh PostgreSQL database per test, on the server named by $INFLUENCE_STORE_TEST_POSTGRES.

`.ci/run` starts that server (scripts/postgres_server.sh) and sets the variable. Without it the tests skip,
except under CI (CI set), where a missing server or driver is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import uuid

import pytest

ENV = "INFLUENCE_STORE_TEST_POSTGRES"


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so the PostgreSQL tests must run; see scripts/postgres_server.sh)")
    pytest.skip(why)


@pytest.fixture
def postgres_url():
    """postgresql+psycopg://... of a new, empty database, dropped after the test."""
    server = os.environ.get(ENV)
    if not server:
        _unavailable(f"${ENV} is not set: no PostgreSQL server to test against")
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'influence-store[postgres]')")
    from sqlalchemy.engine import make_url

    base = make_url(server)
    name = f"influence_store_test_{uuid.uuid4().hex[:12]}"
    admin = dict(host=base.host, port=base.port, user=base.username, password=base.password,
                 dbname=base.database or "postgres", autocommit=True)
    try:
        with psycopg.connect(**admin) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL at {server} does not accept connections: {exc}")
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(**admin) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scores_by_key(location: str, run_id: int) -> dict[tuple[str, str], bytes]:
    """(test key, train key) -> the stored score's 8 bytes, read through the store (any score layout)."""
    import numpy as np

    from influence_store.store import Store

    store = Store(location)
    keys = store.examples(store.example_ids(run_id, "test") + store.example_ids(run_id, "train"))
    out = {(keys[t]["key"], keys[j]["key"]): np.float64(v).tobytes()
           for t in store.example_ids(run_id, "test") for j, v in store.score_rows(run_id, t)}
    store.engine.dispose()
    return out
