"""`influence-store run / runs / scores / db` against a real store: round trip, idempotence, a run killed
with SIGKILL and resumed, two writers at once, and bad input (one line, exit 1, data untouched)."""

import json
import os
import shutil
import signal
import sqlite3
from contextlib import closing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.scoring import SIGN_CONVENTION, compute_scores
from influence_store.store import head_revision
from stored import connect_with_scores
from stored import sql as stored_sql

TESTS = Path(__file__).parent

# Tasks for the CLI, seeded so that every process loads the same weights (same run identity).
SPEC = '''
import time

import torch
from tasks import bce_loss, breast_cancer_task, small_breast_cancer_task


def small():
    torch.manual_seed(0)
    return small_breast_cancer_task()


def paced_loss(model, batch):
    time.sleep(0.05)  # each chunk takes >= ~0.25 s even on a fast machine, so a kill can land between chunks
    return bce_loss(model, batch)


def slow():
    """100 train x 12 test, with lissa at depth 5 and 2 test examples a chunk: 6 chunks."""
    torch.manual_seed(0)
    task = breast_cancer_task(n_train=100)
    task.test = torch.utils.data.Subset(task.test, range(12))
    task.loss = paced_loss
    return task
'''
N_TRAIN, N_TEST, CHUNKS = 100, 12, 6
SLOW_ARGS = ["-a", "lissa", "-o", "depth_iters", "5", "-o", "scale", "10", "-o", "damping", "0.01",
             "--test-chunk-size", "2", "--quiet", "--json"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "store_tasks.py"
    path.write_text(SPEC)
    return str(path)


@pytest.fixture(scope="module")
def tasks_module(spec):
    import importlib.util

    found = importlib.util.spec_from_file_location("store_tasks", spec)
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_reference(tasks_module):
    return compute_scores(tasks_module.small(), "exact", {"damping": 1e-3}, test_chunk_size=7).matrix().numpy()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(path):
    with sqlite3.connect(path) as connection:
        tables = [t for (t,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(connection.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def score_matrix(path, run_id):
    """[n_test, n_train] by position, the number of rows, and the number of distinct (test, train) pairs."""
    with closing(connect_with_scores(path)) as connection:
        position = {(split, e): p for split, p, e in connection.execute(
            "SELECT split, position, example_id FROM run_examples WHERE run_id = ?", (run_id,))}
        rows = connection.execute("SELECT test_example_id, train_example_id, score FROM scores WHERE run_id = ?",
                                  (run_id,)).fetchall()
    n_test = sum(split == "test" for split, _ in position)
    matrix = np.full((n_test, len(position) - n_test), np.nan)
    for t, j, v in rows:
        matrix[position["test", t], position["train", j]] = v
    return matrix, len(rows), len({(t, j) for t, j, _ in rows})


def same_bits(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


# ---------- round trip, provenance, idempotence ----------

def test_run_then_scores_and_runs_show_read_back_exactly(spec, small_reference, tmp_path):
    db = tmp_path / "cli.db"
    out = ok_json(invoke("--db", db, "run", f"{spec}:small", "-a", "exact", "-o", "damping", "0.001",
                         "--test-chunk-size", "7", "--json"))
    assert (out["status"], out["outcome"]) == ("done", "computed")
    run_id = out["run_id"]
    matrix, count, distinct = score_matrix(db, run_id)
    assert count == distinct == 30 * 120 and same_bits(matrix, small_reference)

    top = ok_json(invoke("--db", db, "scores", run_id, "--test", "3", "--top", "4", "--json"))
    assert [r["score"] for r in top["helpful"]] == sorted(small_reference[3], reverse=True)[:4]
    assert [r["score"] for r in top["harmful"]] == sorted(small_reference[3])[:4]
    assert all(r["key"] is not None and r["loss"] >= 0 for r in top["helpful"] + top["harmful"])

    shown = ok_json(invoke("--db", db, "runs", "show", run_id, "--json"))
    assert (shown["status"], shown["approximator"], shown["options"]["damping"]) == ("done", "exact", 0.001)
    assert shown["sign_convention"] == SIGN_CONVENTION and shown["versions"]["torch"] == torch.__version__
    assert shown["task_spec"].endswith("store_tasks.py:small") and shown["chunks_done"] == shown["chunks_total"] == 5
    assert [r["id"] for r in ok_json(invoke("--db", db, "runs", "list", "--json"))] == [run_id]

    csv = invoke("--db", db, "scores", run_id, "--test", "3", "--top", "2", "--csv")
    assert csv.exit_code == 0 and csv.output.splitlines()[0] == "group,key,label,score,loss"
    assert len(csv.output.splitlines()) == 5  # one header (not one per group) and two rows per group
    assert [float(line.split(",")[3]) for line in csv.output.splitlines()[1:3]] == sorted(small_reference[3])[:2]


def test_same_command_again_reports_the_stored_run_and_a_changed_option_adds_one(spec, tmp_path):
    db = tmp_path / "cli.db"
    base = ["--db", db, "run", f"{spec}:small", "-a", "exact", "-o", "damping", "0.001"]
    first = ok_json(invoke(*base, "--json"))
    before = snapshot(db)

    again = invoke(*base)
    assert again.exit_code == 0 and f"run {first['run_id']} already stored (same settings)" in again.output
    assert ok_json(invoke(*base, "--json"))["outcome"] == "existing"
    resumed = ok_json(invoke("--db", db, "run", "-", "--resume", first["run_id"], "--json"))
    assert (resumed["run_id"], resumed["outcome"]) == (first["run_id"], "existing")
    assert snapshot(db) == before

    changed = ok_json(invoke(*base[:-1], "0.01", "--json"))
    assert changed["run_id"] != first["run_id"] and changed["outcome"] == "computed"
    assert len(stored_sql(db, "SELECT * FROM scores")) == 2 * 30 * 120
    assert [r["id"] for r in ok_json(invoke("--db", db, "runs", "list", "--json"))] == [first["run_id"],
                                                                                       changed["run_id"]]


def test_db_path_status_and_backup(spec, tmp_path):
    db = tmp_path / "cli.db"
    assert invoke("db", "path").output.strip() == os.environ["INFLUENCE_STORE_DB"]
    assert invoke("--db", db, "db", "path").output.strip() == str(db)
    run_id = ok_json(invoke("--db", db, "run", f"{spec}:small", "-a", "exact", "--json"))["run_id"]
    status = ok_json(invoke("--db", db, "db", "status", "--json"))
    assert status["revision"] == status["head"] == head_revision() and status["rows"]["scores"] == 30 * 120

    assert invoke("--db", db, "db", "backup", tmp_path / "copy.db").exit_code == 0
    assert snapshot(tmp_path / "copy.db") == snapshot(db)
    assert ok_json(invoke("--db", tmp_path / "copy.db", "runs", "show", run_id, "--json"))["status"] == "done"
    assert_one_line_error(invoke("--db", db, "db", "backup", tmp_path / "copy.db"), "exists; choose a new path")


# ---------- a real process, killed; two real processes at once ----------

def cli_process(spec_args, db, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from influence_store.cli import main; main()", "--db", str(db), "run",
               *spec_args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def progress(db):
    """(status, chunks_done, chunks_total) of the first run, or None before it exists."""
    if not Path(db).exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(
                "SELECT status, chunks_done, chunks_total FROM runs ORDER BY id LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # the schema is still being created
        return None


@pytest.fixture(scope="module")
def slow_reference(tasks_module):
    """The uninterrupted run's scores, computed in this process with the same settings."""
    computation = compute_scores(tasks_module.slow(), "lissa", {"depth_iters": 5, "scale": 10, "damping": 0.01},
                                 test_chunk_size=2)
    return computation.matrix().numpy(), computation.self_influence().numpy()


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_resumes_to_exactly_the_uninterrupted_scores(
        spec, slow_reference, tmp_path):
    db = tmp_path / "crash.db"
    process = cli_process([f"{spec}:slow", *SLOW_ARGS], db)
    deadline = time.monotonic() + 180
    while True:
        state = progress(db)
        if state is not None and state[1] >= 1:
            break
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no chunk was stored in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    status, done, total = progress(db)
    assert status == "running" and 1 <= done < total == CHUNKS, "the kill must land mid-run"
    run_id = 1
    _, count, _ = score_matrix(db, run_id)
    assert count == done * 2 * N_TRAIN  # whole chunks only: a chunk and its progress marker commit together

    resumed = cli_process([f"{spec}:slow", *SLOW_ARGS], db)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["run_id"] == run_id and json.loads(out)["outcome"] == "resumed"

    matrix, count, distinct = score_matrix(db, run_id)
    assert count == distinct == N_TEST * N_TRAIN
    assert same_bits(matrix, slow_reference[0])
    with sqlite3.connect(db) as connection:
        self_influence = [v for (v,) in connection.execute(
            "SELECT self_influence FROM run_examples WHERE run_id = ? AND split = 'train' ORDER BY position",
            (run_id,))]
        assert connection.execute("SELECT status, chunks_done FROM runs WHERE id = ?", (run_id,)).fetchone() == (
            "done", CHUNKS)
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert same_bits(self_influence, slow_reference[1])


@pytest.mark.slow
def test_two_processes_writing_one_store_at_once(spec, tmp_path):
    """Both start on a store that does not exist yet (so they also race to create the schema)."""
    db = tmp_path / "shared.db"
    processes = [cli_process([f"{spec}:slow", *SLOW_ARGS[:10], damping, *SLOW_ARGS[11:]], db)
                 for damping in ("0.01", "0.02")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]

    for code, out, err in results:
        if code == 0:
            assert json.loads(out)["status"] == "done"
        else:  # allowed, if it says why in one line
            assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
    assert any(code == 0 for code, _, _ in results)
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        runs = connection.execute("SELECT id, status, chunks_done FROM runs ORDER BY id").fetchall()
    finished = [run_id for run_id, status, done in runs if status == "done"]
    assert len(finished) == sum(code == 0 for code, _, _ in results)
    assert all(done == CHUNKS for _, status, done in runs if status == "done")
    for run_id in finished:
        _, count, distinct = score_matrix(db, run_id)
        assert count == distinct == N_TEST * N_TRAIN


def test_a_command_closes_its_store_before_the_process_exits(spec, tmp_path):
    """The CLI skips the garbage collector's passes at exit, so it closes its stores itself: the last
    connection folds SQLite's write-ahead log into the file, which is then the whole store on its own."""
    db = tmp_path / "closed.db"
    done = cli_process([f"{spec}:small", "-a", "exact", "--json"], db)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    alone = tmp_path / "alone.db"
    alone.write_bytes(db.read_bytes())  # the file alone, as someone copying it would
    with closing(sqlite3.connect(alone)) as connection:
        assert connection.execute("SELECT status FROM runs WHERE id = ?", (json.loads(out)["run_id"],)).fetchall() \
            == [("done",)]


# ---------- bad input: one line, exit code 1, stored data untouched ----------

@pytest.fixture
def stored(spec, tmp_path):
    """A store with one finished run, and a snapshot of its rows."""
    db = tmp_path / "cli.db"
    run_id = ok_json(invoke("--db", db, "run", f"{spec}:small", "-a", "exact", "--json"))["run_id"]
    return db, run_id, snapshot(db)


def test_unknown_run_id_and_test_key(stored):
    db, run_id, before = stored
    for args in (["runs", "show", 42], ["scores", 42], ["scores", 42, "--test", "0"], ["run", "-", "--resume", 42]):
        assert_one_line_error(invoke("--db", db, *args), "no run 42", f"runs go up to {run_id}")
    assert_one_line_error(invoke("--db", db, "scores", "abc"), "run id must be a number, got 'abc'")
    assert_one_line_error(invoke("--db", db, "scores", run_id, "--test", "nope"),
                          "has no test example with key 'nope'", "test keys look like: 0, 1, 2")
    assert snapshot(db) == before


def test_a_file_that_is_not_sqlite(spec, tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("run,score\n1,0.5\n")
    for args in (["init"], ["runs", "list"], ["run", f"{spec}:small", "-a", "exact"], ["db", "status"]):
        assert_one_line_error(invoke("--db", target, *args), "is not a SQLite database")
    assert target.read_text() == "run,score\n1,0.5\n"


def test_a_store_from_a_newer_schema(stored, spec):
    db, run_id, _ = stored
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffff'")
    before = snapshot(db)
    for args in (["runs", "list"], ["scores", run_id], ["run", f"{spec}:small", "-a", "exact"], ["init"],
                 ["db", "upgrade"]):
        assert_one_line_error(invoke("--db", db, *args), "schema revision 'ffff', newer than this influence-store")
    assert snapshot(db) == before


def test_a_folder_that_does_not_exist(spec, tmp_path):
    for args in (["init"], ["run", f"{spec}:small", "-a", "exact"]):
        assert_one_line_error(invoke("--db", tmp_path / "nope" / "s.db", *args), "folder", "does not exist")
    assert_one_line_error(invoke("--db", tmp_path / "absent.db", "db", "status"), "no store at")
    assert not (tmp_path / "nope").exists() and not (tmp_path / "absent.db").exists()


READ_ONLY_CASES = '''
import json, sys
from click.testing import CliRunner
import influence_store.cli.commands
from influence_store.cli.main import cli
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(cli, args)
    print(json.dumps([result.exit_code, result.output]))
'''


def test_read_only_locations(stored):
    """A new store in a folder this user cannot write, and an existing store in such a folder. Permissions
    do not bind root, so as root the commands run as user nobody (setpriv)."""
    db, _, before = stored
    base = Path(tempfile.mkdtemp(prefix="influence-store-ro-"))  # outside tmp_path, which only root may enter
    try:
        assert invoke("--db", db, "db", "backup", base / "kept.db").exit_code == 0  # the WAL's rows too
        (base / "closed").mkdir()
        for path in (base, base / "kept.db", base / "closed"):
            path.chmod(0o555 if path.is_dir() else 0o444)
        cases = [["--db", str(base / "new.db"), "init"], ["--db", str(base / "kept.db"), "runs", "list"],
                 ["--db", str(base / "closed" / "new.db"), "init"]]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: permissions cannot be tested")
            (base / "closed").chmod(0o500)  # nobody may not even look inside
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                       READ_ONLY_CASES, json.dumps(cases)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            results = [json.loads(line) for line in done.stdout.splitlines()]
        else:
            results = [(r.exit_code, r.output) for r in map(lambda args: invoke(*args), cases)]
        for (code, output), fragment in zip(results, ["is not writable", "read-only", "choose another --db path"]):
            assert code == 1 and len(output.strip().splitlines()) == 1 and output.startswith("Error: "), output
            assert fragment in output, output
        assert not (base / "new.db").exists()
        assert snapshot(base / "kept.db") == before
    finally:
        for path in (base, base / "closed"):
            path.chmod(0o755)
        shutil.rmtree(base)
