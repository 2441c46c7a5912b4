"""Several processes share one run through the store: block claims with leases, on SQLite and PostgreSQL.

Every test drives real ``influence-store run`` processes (by hand or as Dask workers), kills or interrupts
some of them, and checks the stored scores bit for bit against a single-process SQLite run of the same
task, that every block was stored once (``chunks_done == chunks_total``: each stored block counts once),
and what the run's status says while and after processes die.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from postgres_server import postgres_url, scores_by_key  # noqa: F401  (a fixture)
from sqlalchemy import create_engine, text

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli

TESTS = Path(__file__).parent
SPEC = '''
import os
import time

import torch
from tasks import bce_loss, breast_cancer_task


def paced(pace=None):
    """100 train x 12 test; every loss call sleeps ``pace`` seconds (else $PACE; 0.01 once the file
    $PACE_FAST_AFTER exists), so blocks take a while. The environment, not task options, so that processes
    paced differently still compute one run (task options are part of a run's identity)."""
    def loss(model, batch):
        fast_after = os.environ.get("PACE_FAST_AFTER", "")
        seconds = pace if pace is not None else os.environ.get("PACE", "0.01")
        time.sleep(0.01 if fast_after and os.path.exists(fast_after) else float(seconds))
        return bce_loss(model, batch)

    task = breast_cancer_task(n_train=100)
    task.test = torch.utils.data.Subset(task.test, range(12))
    task.loss = loss
    return task
'''
BLOCKS = 12  # one test example a block
ARGS = ["-a", "lissa", "-o", "depth_iters", "5", "-o", "scale", "10", "-o", "damping", "0.01",
        "--test-chunk-size", "1", "--quiet", "--json"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "shared_tasks.py"
    path.write_text(SPEC)
    return f"{path}:paced"


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory):
    """The scores of one ordinary process into a SQLite store (same task, same settings)."""
    db = tmp_path_factory.mktemp("reference") / "one.db"
    result = CliRunner().invoke(cli, ["--db", str(db), "run", spec, *ARGS, "-t", "pace", "0"])
    assert result.exit_code == 0, result.output
    return scores_by_key(str(db), json.loads(result.stdout)["run_id"])


def start(db, spec, *extra, pace="0.01", fast_after=""):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "PACE": pace, "PACE_FAST_AFTER": fast_after}
    command = [sys.executable, "-c", "from influence_store.cli import main; main()", "--db", str(db), "run", spec,
               *ARGS, *extra]
    # Ctrl-C as on a terminal, even where the test runner was started with SIGINT ignored (which children
    # inherit, and Python then installs no KeyboardInterrupt handler).
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def query(db, sql: str) -> list[tuple]:
    """Plain SQL on either store; [] while the schema does not exist yet."""
    url = db if "://" in str(db) else f"sqlite:///{db}"
    if "://" not in str(db) and not Path(db).exists():
        return []
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(text(sql))]
    except Exception:  # the tables are being created
        return []
    finally:
        engine.dispose()


def wait_for(condition, what: str, processes=(), seconds: float = 240):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        for p in processes:
            assert p.poll() is None, (what, p.communicate())
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def held_blocks(db) -> list[tuple[int, str]]:
    """(block, owner) of the blocks leased right now and not stored yet."""
    return query(db, "SELECT c.block, c.owner FROM run_claims c WHERE c.run_id = 1 AND c.finished_utc IS NULL "
                     f"AND c.lease_expires > {time.time()} AND c.block >= 0 AND NOT EXISTS (SELECT 1 FROM run_chunks "
                     "k WHERE k.run_id = 1 AND k.chunk_index = c.block)")


def pid_of(owner: str) -> int:
    return int(owner.split(":")[1])


def finished(process) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out)


def assert_complete(db, reference):
    assert query(db, "SELECT status, chunks_done, chunks_total FROM runs WHERE id = 1") == [("done", BLOCKS, BLOCKS)]
    assert query(db, "SELECT count(*) FROM run_chunks WHERE run_id = 1") == [(BLOCKS,)]
    assert scores_by_key(str(db), 1) == reference  # bit for bit, same count


def test_two_dask_workers_into_postgresql_one_killed_mid_run_store_the_single_process_scores(
        postgres_url, spec, reference):
    """`run --workers 2` into PostgreSQL; SIGKILL one worker while it holds a block: the run completes, every
    block stored once, and the scores are those of one process into SQLite."""
    pytest.importorskip("distributed")
    driver = start(postgres_url, spec, "--workers", "2", "--lease", "2", pace="0.03")
    block, owner = wait_for(lambda: held_blocks(postgres_url), "a worker to hold a block", [driver])[0]
    os.kill(pid_of(owner), signal.SIGKILL)

    assert finished(driver)["run_id"] == 1
    assert_complete(postgres_url, reference)
    (claims,) = query(postgres_url, f"SELECT claims FROM run_claims WHERE run_id = 1 AND block = {block}")
    assert claims[0] >= 2  # the dead worker's block was taken over when its lease ran out


def test_a_process_that_joined_and_is_interrupted_leaves_the_run_to_the_other(spec, reference, tmp_path):
    db, fast = tmp_path / "shared.db", tmp_path / "fast"
    # One registers the run, the other joins. Every block takes seconds in both until both hold one, however
    # loaded the machine (neither can finish the run alone first); then the first speeds up, and the second is
    # still busy with its block when it is interrupted.
    first = start(db, spec, pace="1.0", fast_after=str(fast))
    second = start(db, spec, pace="1.0")
    owners = wait_for(lambda: {pid_of(o) for _, o in held_blocks(db)} >= {first.pid, second.pid} and held_blocks(db),
                      "both processes to hold blocks", [first, second])
    assert len(owners) >= 2
    fast.touch()
    listed = json.loads(CliRunner().invoke(cli, ["--db", str(db), "runs", "list", "--json"]).stdout)[0]
    assert listed["status"] == "running" and len(listed["workers"]) == 2

    second.send_signal(signal.SIGINT)
    output = second.communicate(timeout=120)
    assert second.returncode == 1, output
    assert output[1].strip().splitlines()[-1] == ("Error: interrupted; the chunks already stored are kept: the same "
                                                  "command resumes the run"), output
    # Not "failed": the first process still works on it (or, on a slow machine, has finished it meanwhile).
    assert query(db, "SELECT status, error FROM runs WHERE id = 1") in ([("running", None)], [("done", None)])

    assert finished(first)["run_id"] == 1
    assert_complete(db, reference)


def test_a_killed_run_shows_interrupted_then_the_same_command_finishes_it(spec, reference, tmp_path):
    db = tmp_path / "killed.db"
    process = start(db, spec, "--lease", "1", pace="0.1")
    wait_for(lambda: query(db, "SELECT 1 FROM run_chunks WHERE run_id = 1") and held_blocks(db), "a stored block",
             [process])  # killed while it holds a block: that lease must run out by itself
    process.send_signal(signal.SIGKILL)
    process.wait()

    def shown():
        return json.loads(CliRunner().invoke(cli, ["--db", str(db), "runs", "show", "1", "--json"]).stdout)

    wait_for(lambda: shown()["status"] == "interrupted", "the lease to run out", seconds=10)
    assert shown()["workers"] == [] and query(db, "SELECT status FROM runs WHERE id = 1") == [("running",)]

    again = CliRunner().invoke(cli, ["--db", str(db), "run", spec, *ARGS], env={"PACE": "0"})
    assert again.exit_code == 0, again.output
    assert (json.loads(again.stdout)["run_id"], json.loads(again.stdout)["outcome"]) == (1, "resumed")
    assert_complete(db, reference)
    assert shown()["status"] == "done"


@pytest.mark.parametrize("hidden, args, extra", [
    ("distributed", ["--workers", "2"], "influence-store[dask]"),
    ("psycopg", ["--db", "postgresql://someone@127.0.0.1:1/db"], "influence-store[postgres]"),
])
def test_a_missing_optional_extra_is_one_line_naming_it(spec, tmp_path, monkeypatch, hidden, args, extra):
    monkeypatch.setitem(sys.modules, hidden, None)  # as if the extra were not installed
    monkeypatch.setenv("INFLUENCE_STORE_DB", str(tmp_path / "store.db"))
    db = args[1] if args[0] == "--db" else str(tmp_path / "store.db")
    result = CliRunner().invoke(cli, ["--db", db, "run", spec, *ARGS, *[a for a in args if args[0] != "--db"]])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and extra in line, line
