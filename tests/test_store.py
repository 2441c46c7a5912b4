"""The store through its Python API: every score read back bit for bit with its provenance, idempotent
re-runs, a changed setting gives a new run, an interrupted run resumes to exactly the uninterrupted
scores, and bad input is one clear line that leaves stored data untouched."""

import sqlite3
from contextlib import closing

import numpy as np
import pytest
import torch

from influence_store.errors import InfluenceStoreError
from influence_store.runs import execute_run, weights_sha256
from influence_store.scoring import SIGN_CONVENTION, compute_scores
from influence_store.store import Store, head_revision
from stored import connect_with_scores
from tasks import small_breast_cancer_task

DAMPING = 1e-3
CHUNK = 7  # 30 test examples -> chunks of 7, 7, 7, 7, 2


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)  # fit_logistic starts from nn.Linear's random init
    return small_breast_cancer_task()


@pytest.fixture(scope="module")
def reference(task):
    """Scores and self-influence computed without any store: what the store must hand back."""
    computation = compute_scores(task, "exact", {"damping": DAMPING}, test_chunk_size=CHUNK)
    return computation.matrix().numpy(), computation.self_influence().numpy()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "store.db")


def run_exact(store, task, **changes):
    kwargs = {"approximator": "exact", "options": {"damping": DAMPING}, "test_chunk_size": CHUNK, **changes}
    return execute_run(store, task, **kwargs)


def stored_scores(path, run_id):
    """The run's scores as an [n_test, n_train] matrix and the row count, read with plain sqlite3."""
    with closing(connect_with_scores(path)) as connection:
        position = {(split, example): p for split, p, example in connection.execute(
            "SELECT split, position, example_id FROM run_examples WHERE run_id = ?", (run_id,))}
        rows = connection.execute(
            "SELECT test_example_id, train_example_id, score FROM scores WHERE run_id = ?", (run_id,)).fetchall()
    n_test = sum(split == "test" for split, _ in position)
    matrix = np.full((n_test, len(position) - n_test), np.nan)
    for test_id, train_id, score in rows:
        matrix[position["test", test_id], position["train", train_id]] = score
    return matrix, len(rows)


def same_bits(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


def snapshot(path):
    """Every row of every table: what 'stored data untouched' compares."""
    with sqlite3.connect(path) as connection:
        tables = [t for (t,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(connection.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


@pytest.fixture
def spy(monkeypatch):
    """Records every chunk handed to Store.write_chunk (a copy of exactly what was computed)."""
    calls = []
    original = Store.write_chunk

    def write_chunk(self, run_id, chunk_index, test_ids, train_ids, scores):
        calls.append((chunk_index, list(test_ids), list(train_ids), np.array(scores, copy=True)))
        return original(self, run_id, chunk_index, test_ids, train_ids, scores)

    monkeypatch.setattr(Store, "write_chunk", write_chunk)
    return calls


# ---------- round trip ----------

def test_every_score_round_trips_bit_for_bit_with_provenance(task, reference, path, spy):
    store = Store(path)
    result = run_exact(store, task)

    assert (result.status, result.outcome) == ("done", "computed")
    matrix, count = stored_scores(path, result.run_id)
    assert count == matrix.size == 30 * 120
    assert same_bits(matrix, reference[0])
    for _, test_ids, train_ids, scores in spy:  # and each chunk exactly as it was handed over
        with closing(connect_with_scores(path)) as connection:
            back = dict(((t, j), v) for t, j, v in connection.execute(
                "SELECT test_example_id, train_example_id, score FROM scores WHERE run_id = ?", (result.run_id,)))
        assert same_bits([[back[t, j] for j in train_ids] for t in test_ids], scores)
    assert [c[0] for c in spy] == [0, 1, 2, 3, 4]

    run = store.run(result.run_id)
    assert (run["status"], run["approximator"], run["options"]["damping"], run["freeze"]) == (
        "done", "exact", DAMPING, "all")
    assert (run["chunks_done"], run["chunks_total"], run["n_train"], run["n_test"]) == (5, 5, 120, 30)
    assert run["effective_damping"] == DAMPING and run["sign_convention"] == SIGN_CONVENTION
    assert (run["seed"], run["device"], run["num_params"]) == (0, "cpu", 31)
    assert run["versions"]["torch"] == torch.__version__ and "influence_store" in run["versions"]
    assert run["settings"]["tracked_parameters"] == ["weight", "bias"] and run["settings"]["dtype"] == "float64"
    assert run["error"] is None and run["finished_utc"] and run["seconds_total"] > run["seconds_writing"] > 0
    assert store.version(run["model_version"])["weights_sha256"] == weights_sha256(task.model)

    by_key = {r["key"]: r["self_influence"] for r in store.self_influence(result.run_id)}
    assert same_bits([by_key[k] for k in task.keys("train")], reference[1])
    top = store.top_scores(result.run_id, "3", 4)  # test key "3" is test position 3
    assert [r["score"] for r in top["helpful"]] == sorted(reference[0][3], reverse=True)[:4]
    assert [r["score"] for r in top["harmful"]] == sorted(reference[0][3])[:4]


def make_run(store, n_train, n_test, fingerprint="fp"):
    """A run registered directly, for writing hand-made chunks."""
    settings = {"approximator": "exact", "options": {}, "freeze": "all", "freeze_options": {},
                "tracked_fingerprint": "t", "num_params": 1, "seed": 0, "effective_damping": 0.0,
                "sign_convention": SIGN_CONVENTION, "versions": {}, "device": "cpu"}
    run_id = store.create_run(
        version_name="v", weights_sha256="w", train_dataset="d", test_dataset="d/test",
        train_rows=[(f"tr{i}", f"h{i}", None, {}) for i in range(n_train)],
        test_rows=[(f"te{i}", f"g{i}", None, {}) for i in range(n_test)], train_losses=[0.0] * n_train,
        test_losses=[0.0] * n_test, task_spec="t", task_options={}, settings=settings,
        settings_fingerprint=fingerprint, chunks_total=2)
    return run_id, store.example_ids(run_id, "train"), store.example_ids(run_id, "test")


def test_extreme_floats_round_trip_and_chunks_are_written_once(path):
    """Random bit patterns, subnormals, the largest double; sizes that are not a multiple of the insert batch."""
    store = Store(path)
    run_id, train_ids, test_ids = make_run(store, 613, 3)
    values = np.random.default_rng(0).integers(0, 2 ** 63 - 1, (3, 613), dtype=np.int64).view(np.float64)
    values[~np.isfinite(values)] = 0.5
    values *= np.where(np.arange(613) % 2, 1.0, -1.0)
    values[0, :4] = [5e-324, -1.7976931348623157e308, 0.1 + 0.2, 2.0 ** -1074 * 3]

    assert store.write_chunk(run_id, 0, test_ids, train_ids, values) > 0
    store.write_chunk(run_id, 0, test_ids, train_ids, values + 1.0)  # the same chunk again: skipped

    matrix, count = stored_scores(path, run_id)
    assert count == 3 * 613 and same_bits(matrix, values)
    assert store.run(run_id)["chunks_done"] == 1
    with store.engine.connect() as connection:  # the fast path switched foreign keys off only for itself
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []


def test_negative_zero_is_stored_as_zero(path):
    """-0.0 reads back numerically equal as a SQL REAL (SQLite keeps a REAL that equals an integer as that
    integer, so a row per score loses its sign); in its block it keeps even its sign bit."""
    store = Store(path)
    run_id, train_ids, test_ids = make_run(store, 2, 1)
    store.write_chunk(run_id, 0, test_ids, train_ids, np.array([[-0.0, 1.0]]))
    matrix, _ = stored_scores(path, run_id)
    assert matrix.tolist() == [[0.0, 1.0]]
    assert np.signbit(store.score_matrix(run_id)[0, 0])


@pytest.mark.parametrize("scores, test_slice, train_slice, fragment", [
    (np.array([[np.nan, 1.0]]), slice(0, 1), slice(0, 2), "NaN or infinite scores"),
    (np.array([[np.inf, 1.0]]), slice(0, 1), slice(0, 2), "NaN or infinite scores"),
    (np.ones((1, 3)), slice(0, 1), slice(0, 2), "scores have shape (1, 3), expected (1, 2)"),
])
def test_bad_chunks_store_nothing(path, scores, test_slice, train_slice, fragment):
    store = Store(path)
    run_id, train_ids, test_ids = make_run(store, 2, 1)
    before = snapshot(path)
    with pytest.raises(InfluenceStoreError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        store.write_chunk(run_id, 0, test_ids[test_slice], train_ids[train_slice], scores)
    assert snapshot(path) == before


def test_chunk_ids_must_be_the_runs_examples(path):
    """Foreign keys are off for the bulk insert, so write_chunk checks the ids itself."""
    store = Store(path)
    run_a, train_a, test_a = make_run(store, 2, 1, "a")
    run_b, train_b, test_b = make_run(store, 2, 1, "b")  # same examples (same keys and hashes): same ids
    assert train_a == train_b
    before = snapshot(path)
    for test_ids, train_ids in ([train_a[0]], train_a), (test_a, [train_a[0], train_a[0]]), (test_a, [999, 1000]):
        with pytest.raises(InfluenceStoreError, match="example ids repeat or are not the run's"):
            store.write_chunk(run_a, 0, test_ids, train_ids, np.zeros((len(test_ids), len(train_ids))))
    with pytest.raises(InfluenceStoreError, match="no run 77"):
        store.write_chunk(77, 0, test_a, train_a, np.zeros((1, 2)))
    assert snapshot(path) == before


# ---------- idempotence, new runs, resume ----------

def test_same_settings_again_is_a_no_op(task, path, spy):
    store = Store(path)
    first = run_exact(store, task)
    before = snapshot(path)
    spy.clear()

    again = run_exact(store, task)

    assert (again.run_id, again.outcome) == (first.run_id, "existing")
    assert spy == [] and snapshot(path) == before


@pytest.mark.parametrize("changes", [{"options": {"damping": 1e-2}}, {"seed": 1}, {"test_chunk_size": 10}])
def test_changed_setting_is_a_new_run_beside_the_old(task, reference, path, changes):
    store = Store(path)
    first = run_exact(store, task)
    examples_before = snapshot(path)["examples"]

    second = run_exact(store, task, **changes)

    assert second.run_id != first.run_id and second.outcome == "computed"
    assert [r["id"] for r in store.runs()] == [first.run_id, second.run_id]
    assert same_bits(stored_scores(path, first.run_id)[0], reference[0])  # the old run is untouched
    assert stored_scores(path, second.run_id)[1] == 30 * 120
    assert snapshot(path)["examples"] == examples_before  # same examples: same rows, shared by both runs
    assert store.example_ids(first.run_id, "train") == store.example_ids(second.run_id, "train")
    close = np.allclose(stored_scores(path, second.run_id)[0], reference[0], rtol=1e-9, atol=0)
    assert close != ("options" in changes)  # damping moves the scores; seed and chunking of exact do not


@pytest.mark.parametrize("how", ["the same call again", "resume=run id"])
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_scores(task, reference, path, spy, monkeypatch, how):
    store = Store(path)
    original = Store.write_chunk
    calls = {"n": 0}

    def failing(self, run_id, chunk_index, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk unplugged")
        return original(self, run_id, chunk_index, *args)

    monkeypatch.setattr(Store, "write_chunk", failing)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        run_exact(store, task)
    monkeypatch.setattr(Store, "write_chunk", original)
    run_id = store.runs()[0]["id"]
    stopped = store.run(run_id)
    assert (stopped["status"], stopped["error"], stopped["chunks_done"]) == ("failed", "disk unplugged", 2)
    assert stored_scores(path, run_id)[1] == 2 * CHUNK * 120

    spy.clear()
    if how == "resume=run id":
        resumed = execute_run(store, task, resume=run_id)  # settings come from the stored run
    else:
        resumed = run_exact(store, task)  # found by its settings fingerprint

    assert (resumed.run_id, resumed.outcome) == (run_id, "resumed")
    assert sorted(c[0] for c in spy) == [2, 3, 4]  # only the missing chunks were computed
    matrix, count = stored_scores(path, run_id)
    assert count == 30 * 120 and same_bits(matrix, reference[0])
    done = store.run(run_id)
    assert (done["status"], done["error"], done["chunks_done"]) == ("done", None, 5)
    assert run_exact(store, task).outcome == "existing"


def test_resume_refuses_a_different_model(task, path):
    store = Store(path)
    run_id = run_exact(store, task).run_id
    other = small_breast_cancer_task()
    with torch.no_grad():
        other.model.bias += 1.0
    with pytest.raises(InfluenceStoreError, match=f"run {run_id} cannot be resumed"):
        execute_run(store, other, resume=run_id)


def test_new_weights_under_an_existing_version_name_are_refused(task, path):
    store = Store(path)
    run_exact(store, task, model_version="v1")
    before = snapshot(path)
    other = small_breast_cancer_task()
    with torch.no_grad():
        other.model.bias += 1.0
    with pytest.raises(InfluenceStoreError, match="'v1' was recorded with other weights"):
        run_exact(store, other, model_version="v1")
    assert snapshot(path) == before


# ---------- bad input: one line, stored data untouched ----------

def one_line(call, *fragments):
    with pytest.raises(InfluenceStoreError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_file_that_is_not_sqlite_is_refused_and_kept(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_bytes(b"my notes, not a database\n" * 10)
    one_line(lambda: Store(str(target)), "is not a SQLite database")
    assert target.read_bytes() == b"my notes, not a database\n" * 10


def test_a_newer_schema_is_refused_and_kept(path):
    Store(path)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffff'")
    before = snapshot(path)
    one_line(lambda: Store(path), "schema revision 'ffff', newer than this influence-store knows",
             f"head '{head_revision()}'")
    assert snapshot(path) == before


def test_unknown_run_and_test_key(task, path):
    store = Store(path)
    run_id = run_exact(store, task).run_id
    before = snapshot(path)
    one_line(lambda: store.run(run_id + 1), f"no run {run_id + 1}", f"runs go up to {run_id}")
    one_line(lambda: store.run("latest"), "run id must be a number, got 'latest'")
    one_line(lambda: store.top_scores(run_id, "no-such-key", 3), "has no test example with key 'no-such-key'",
             "test keys look like: 0, 1, 2")
    assert snapshot(path) == before


def test_a_folder_that_does_not_exist_is_not_created(tmp_path):
    one_line(lambda: Store(str(tmp_path / "missing" / "store.db")), "folder", "does not exist")
    assert not (tmp_path / "missing").exists()


def test_opening_without_create_does_not_make_a_store(tmp_path):
    one_line(lambda: Store(str(tmp_path / "store.db"), create=False), "no store at", "create one with Store(")
    assert not (tmp_path / "store.db").exists()


def test_readers_neither_wait_for_nor_block_a_writer(tmp_path):
    """Listing runs while another process holds the write lock answers at once; writes still queue."""
    import sqlite3
    import time as clock

    from influence_store.store import Store

    path = tmp_path / "locked.db"
    store = Store(str(path))
    store.add_version("v1")
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE model_versions SET notes = 'busy'")
    started = clock.perf_counter()
    assert [v["name"] for v in store.versions()] == ["v1"]  # the committed snapshot, without the open write
    assert store.runs() == []
    assert clock.perf_counter() - started < 20  # a reader taking the write lock would wait 60 s, then fail
    with sqlite3.connect(path, timeout=0) as other:  # and the lock really is held: another writer is refused
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    writer.execute("COMMIT")
    assert store.version("v1")["notes"] == "busy"


def test_a_run_created_meanwhile_by_another_process_is_joined_not_duplicated(tmp_path, monkeypatch):
    """Two processes that both saw no run with these settings: the second one to register joins the first."""
    from influence_store.runs import execute_run
    from influence_store.store import Store
    from tasks import small_breast_cancer_task

    store = Store(str(tmp_path / "race.db"))
    task = small_breast_cancer_task()
    first = execute_run(store, task, approximator="exact", self_influence=False)
    monkeypatch.setattr(Store, "find_run", lambda self, fingerprint: None)  # as if it looked before `first` existed
    second = execute_run(store, task, approximator="exact", self_influence=False)
    assert (second.run_id, second.outcome) == (first.run_id, "existing")
    assert len(store.runs()) == 1
    n_scores = store.run(first.run_id)["n_train"] * store.run(first.run_id)["n_test"]
    assert len(store.score_values(first.run_id)) == n_scores
