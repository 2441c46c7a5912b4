"""What a tester tried on the files and stores that commands are pointed at: a FIFO as an output file,
modes of written files, folders that cannot be written, an in-memory or empty --db, blank version names,
a CSV that is not UTF-8, another tool's database, `runs --db`, and settings given with --resume. Each
bad input gives one clear line, exit 1, and leaves the store and the files as they were."""

import json
import os
import sqlite3
import stat

import pytest

from influence_store.errors import InfluenceStoreError
from influence_store.store import Store
from stored import copy_store
from test_hardening_cli import SPEC, invoke, ok, one_line_error, snapshot, sql


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "file_tasks.py"
    path.write_text(SPEC)
    return f"{path}:small"


@pytest.fixture(scope="module")
def template(spec, tmp_path_factory):
    """A store with one finished exact run of the small task (version v1) and one proposal."""
    db = tmp_path_factory.mktemp("files") / "template.db"
    ok(invoke("--db", db, "run", spec, "-a", "exact", "--model-version", "v1", "--json"))
    ok(invoke("--db", db, "propose", 1, "--top", 1))
    return db


@pytest.fixture
def db(template, tmp_path):
    return copy_store(template, tmp_path / "store.db")


def dataset_of(db):
    return sql(db, "SELECT name FROM datasets WHERE id = (SELECT train_dataset_id FROM runs)")[0][0]


# ---------- what is at the output path ----------

def test_export_and_report_refuse_a_fifo_and_leave_it_there(db, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    before = snapshot(db)
    one_line_error(invoke("--db", db, "export", "--dataset", dataset_of(db), "--output", fifo, "--version", "v2",
                          "--force"), f"'{fifo}' is not a regular file")
    one_line_error(invoke("--db", db, "report", 1, "--output", fifo, "--force"), f"'{fifo}' is not a regular file")
    one_line_error(invoke("--db", db, "examples", "show", "0", "--dataset", dataset_of(db), "-o", fifo, "--force"),
                   f"'{fifo}' is not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and snapshot(db) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("store.db")) == ["pipe"]


def test_written_files_get_the_umask_mode_or_keep_the_replaced_files(db, tmp_path):
    old = os.umask(0o022)
    try:
        ok(invoke("--db", db, "export", "--dataset", dataset_of(db), "--output", tmp_path / "c.jsonl", "--version",
                  "v2"))
        kept = tmp_path / "r.html"
        kept.write_text("old")
        kept.chmod(0o640)
        ok(invoke("--db", db, "report", 1, "--output", kept, "--force"))
    finally:
        os.umask(old)
    for name, mode in (("c.jsonl", 0o644), ("c.removals.json", 0o644), ("r.html", 0o640)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_cannot_be_written_names_the_target_and_the_fix(db):
    before = snapshot(db)
    for args, target in ((["export", "--dataset", dataset_of(db), "--output", "/proc/x.jsonl", "--version", "v2"],
                          "/proc/x.jsonl"),
                         (["report", 1, "--output", "/proc/r.html"], "/proc/r.html"),
                         (["db", "backup", "/proc/b.db"], "/proc/b.db"),
                         (["examples", "show", "0", "--dataset", dataset_of(db), "-o", "/proc/d.txt"], "/proc/d.txt")):
        one_line_error(invoke("--db", db, *args), f"'{target}'", "choose a writable folder")
    assert snapshot(db) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_folder_is_named(db, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        one_line_error(invoke("--db", db, "report", 1, "--output", folder / "r.html"), "is not writable",
                       "choose a writable folder")
    finally:
        folder.chmod(0o755)


def test_examples_show_needs_force_to_replace_a_file(db, tmp_path):
    target = tmp_path / "mine.txt"
    target.write_text("mine")
    args = ["--db", db, "examples", "show", "0", "--dataset", dataset_of(db), "-o", target]
    one_line_error(invoke(*args), "exists; pass --force")
    assert target.read_text() == "mine"
    ok(invoke(*args, "--force"))
    assert target.read_text() != "mine"


# ---------- where the store is ----------

def test_an_in_memory_or_empty_db_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["init", "--db", ":memory:"], ["--db", ":memory:", "versions", "add", "foo"],
                 ["--db", ":memory:", "runs"]):
        one_line_error(invoke(*args), "in-memory database")
    for args in (["init", "--db", ""], ["--db", " ", "versions", "add", "foo"], ["runs", "--db", ""]):
        one_line_error(invoke(*args), "--db is empty")
    assert list(tmp_path.iterdir()) == []


def test_the_listing_groups_take_db(db):
    assert [r["id"] for r in json.loads(ok(invoke("runs", "--db", db, "--json")).output)] == [1]
    assert [r["id"] for r in json.loads(ok(invoke("proposals", "--db", db, "--json")).output)] == [1]
    assert "v1" in ok(invoke("versions", "--db", db, "--csv")).output
    assert [r["id"] for r in json.loads(ok(invoke("runs", "--db", db, "list", "--json")).output)] == [1]


@pytest.fixture
def foreign(tmp_path):
    """A database that another Alembic-using tool manages, and one without any schema revision."""
    other, plain = tmp_path / "other.db", tmp_path / "plain.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("INSERT INTO alembic_version VALUES ('abc123')")
        connection.execute("CREATE TABLE foo (x)")
    with sqlite3.connect(plain) as connection:
        connection.execute("CREATE TABLE runs (x)")
    return other, plain


def test_another_tools_database_is_not_called_newer(foreign):
    other, plain = foreign
    before = snapshot(other)
    for args in (["db", "status"], ["runs"], ["versions", "add", "x"], ["init"]):
        one_line_error(invoke("--db", other, *args), "is not an influence-store database", "'abc123'")
    one_line_error(invoke("--db", plain, "db", "status"), "is not an influence-store database")
    with pytest.raises(InfluenceStoreError, match="is not an influence-store database"):
        Store(str(other))  # the Python API too
    assert snapshot(other) == before


# ---------- names and files that commands read ----------

def test_blank_version_names_are_refused(db, tmp_path):
    before = snapshot(db)
    one_line_error(invoke("--db", db, "export", "--dataset", dataset_of(db), "--output", tmp_path / "c.jsonl",
                          "--version", ""), "is blank")
    one_line_error(invoke("--db", db, "versions", "add", "  "), "is blank")
    assert snapshot(db) == before and not (tmp_path / "c.jsonl").exists()


def test_a_decisions_file_that_is_not_utf8(db, tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_bytes(b"id,decision,note\n1,accept,caf\xe9\n")
    before = snapshot(db)
    one_line_error(invoke("--db", db, "review", "import", path), f"'{path}' is not UTF-8", "save it as UTF-8")
    assert snapshot(db) == before


# ---------- resume, proposals ----------

def test_settings_given_with_resume_are_refused_not_ignored(db, spec):
    before = snapshot(db)
    one_line_error(invoke("--db", db, "run", spec, "--resume", 1, "-a", "lissa"), "leave out --approximator")
    one_line_error(invoke("--db", db, "run", spec, "--resume", 1, "-o", "damping", "0.1", "--model-version", "v9"),
                   "leave out --option, --model-version")
    assert snapshot(db) == before


def test_proposals_show_prints_no_none_and_propose_hints_a_working_command(db):
    shown = ok(invoke("--db", db, "proposals", "show", 1)).output
    assert "None" not in shown and "new_label: -" in shown
    sql(db, "UPDATE runs SET status = 'failed'")
    one_line_error(invoke("--db", db, "propose", 1), "influence-store run TASK --resume 1")
