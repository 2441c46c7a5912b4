"""Reads never create or migrate a store, `db status`/`db downgrade` work across revisions, odd store URLs
and ids give one line, and the CLI is consistent: `--json`/`--csv` on bare listings, full-precision CSV,
one meaning per flag (old spellings still work), `--top` checked alike, help text on every option, and
`runs` listed without loading SQLAlchemy, Alembic or numpy."""

import csv
import io
import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store import store_file
from influence_store.cli.main import cli
from influence_store.store import Store, _alembic_config
from stored import copy_store

SPEC = '''
import torch
from tasks import small_breast_cancer_task


def small():
    torch.manual_seed(0)
    return small_breast_cancer_task()
'''
READS = [["runs"], ["runs", "list"], ["runs", "show", "1"], ["scores", "1"], ["proposals"], ["versions"],
         ["report", "1"], ["compare", "v1", "v2"], ["db", "backup", "copy.db"]]


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def file_state(path):
    """Bytes, table names and journal mode: what a read must leave as it found."""
    with sqlite3.connect(path) as connection:
        tables = sorted(t for (t,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return path.read_bytes(), tables, mode


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hard-store")
    (folder / "tasks_small.py").write_text(SPEC)
    db = folder / "template.db"
    result = invoke("--db", db, "run", f"{folder / 'tasks_small.py'}:small", "-a", "exact", "--model-version", "v1",
                    "--json")
    assert result.exit_code == 0, result.output
    ok = invoke("--db", db, "propose", 1, "--top", 3, "--json")
    assert ok.exit_code == 0, ok.output
    return db


@pytest.fixture
def db(template, tmp_path):
    return copy_store(template, tmp_path / "store.db")


# ---------- reads never create or migrate ----------

@pytest.mark.parametrize("args", READS)
def test_a_read_in_an_empty_folder_creates_nothing(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFLUENCE_STORE_DB")
    one_line_error(invoke(*args), "no store at 'influence-store.db'", "influence-store init")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", READS)
def test_a_read_leaves_someone_elses_sqlite_file_alone(args, tmp_path):
    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as connection:
        connection.execute("CREATE TABLE birds (name TEXT)")
        connection.execute("INSERT INTO birds VALUES ('wren')")
    before = file_state(theirs)
    one_line_error(invoke("--db", theirs, *args), "is not an influence-store database")
    assert file_state(theirs) == before


def test_init_and_run_do_not_add_tables_to_someone_elses_database(tmp_path):
    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as connection:
        connection.execute("CREATE TABLE birds (name TEXT)")
    before = file_state(theirs)
    for args in (["init"], ["run", "x.py:task"], ["versions", "add", "v1"], ["propose", "1"]):
        one_line_error(invoke("--db", theirs, *args), "holds other tables (birds)", "not an influence-store database")
    assert file_state(theirs) == before


def test_reads_of_an_older_schema_ask_for_db_upgrade_and_db_status_works(tmp_path):
    old = tmp_path / "old.db"
    engine = Store(str(old), upgrade=False).engine
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0001")
    before = file_state(old)
    one_line_error(invoke("--db", old, "runs"), "at schema '0001', older", "db upgrade")
    one_line_error(invoke("--db", old, "proposals"), "db upgrade")
    status = invoke("--db", old, "db", "status", "--json")
    assert status.exit_code == 0, status.output
    shown = json.loads(status.output)
    assert shown["revision"] == "0001" and "proposals" not in shown["rows"] and shown["rows"]["runs"] == 0
    assert invoke("--db", old, "db", "backup", tmp_path / "before-upgrade.db").exit_code == 0  # any revision
    assert file_state(old) == before
    assert invoke("--db", old, "db", "upgrade").exit_code == 0
    assert invoke("--db", old, "runs", "--json").output.strip() == "[]"


def test_db_downgrade_moves_back_a_revision_and_upgrade_returns(db):
    runs_before = invoke("--db", db, "runs", "--json").output
    result = invoke("--db", db, "db", "downgrade", "0001", "--yes")
    assert result.exit_code == 0, result.output
    status = json.loads(invoke("--db", db, "db", "status", "--json").output)
    assert status["revision"] == "0001" and "proposals" not in status["rows"] and status["rows"]["runs"] == 1
    as_csv = list(csv.DictReader(io.StringIO(invoke("--db", db, "db", "status", "--csv").output)))
    assert {row["table"]: int(row["rows"]) for row in as_csv} == status["rows"]  # the table alone
    assert invoke("--db", db, "db", "downgrade", "0001", "--yes").exit_code == 0  # already there: no change
    assert invoke("--db", db, "db", "upgrade").exit_code == 0
    assert invoke("--db", db, "runs", "--json").output == runs_before
    one_line_error(invoke("--db", db, "db", "downgrade", "9999", "--yes"), "unknown schema revision '9999'")


def test_head_revision_read_from_the_files_is_alembics():
    assert store_file.head_revision() == ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert store_file.revisions() == {r.revision: r.down_revision
                                      for r in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


# ---------- odd URLs and ids ----------

@pytest.mark.parametrize("url, fragment", [
    ("sqlite:///:memory:", "in-memory database"),
    ("sqlite://", "in-memory database"),
    ("postgresql://someone@localhost/curation", "is not installed: psycopg (pip install 'influence-store[postgres]')"),
])
def test_store_urls_that_cannot_work_say_why(url, fragment, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where the postgres extra is not installed
    for args in (["init"], ["runs"], ["run", "x.py:task"]):
        one_line_error(invoke("--db", url, *args), fragment)


def test_ids_beyond_what_the_store_holds_are_usage_errors(db):
    huge = "9" * 20
    for args in (["proposals", "show", huge], ["review", "accept", huge], ["verify", huge], ["report", huge],
                 ["propose", huge], ["compare", "v1", "v1", "--old-run", huge]):
        result = invoke("--db", db, *args)
        assert result.exit_code == 2 and "Traceback" not in result.output and "Overflow" not in result.output
    one_line_error(invoke("--db", db, "scores", huge), "run id must be a positive number below 2**63")
    one_line_error(invoke("--db", db, "runs", "show", huge), "run id must be a positive number")


# ---------- CLI consistency ----------

def test_bare_listings_take_json_and_csv(db):
    for group in ("runs", "proposals", "versions"):
        bare = invoke("--db", db, group, "--json")
        assert bare.exit_code == 0, bare.output
        assert json.loads(bare.output) == json.loads(invoke("--db", db, group, "list", "--json").output) != []
        assert invoke("--db", db, group, "--csv").output == invoke("--db", db, group, "list", "--csv").output


def test_runs_listed_with_sqlite3_equal_the_stores_runs(db):
    assert json.loads(invoke("--db", db, "runs", "--json").output) == json.loads(
        json.dumps(Store(str(db)).runs(), default=str))
    assert invoke("--db", db, "runs", "list", "--status", "failed", "--json").output.strip() == "[]"
    assert len(json.loads(invoke("--db", db, "runs", "list", "--version", "v1", "--json").output)) == 1


def test_csv_keeps_every_digit_and_evidence_is_json(db):
    rows = list(csv.DictReader(io.StringIO(invoke("--db", db, "proposals", "--csv").output)))
    stored = {p["id"]: p for p in Store(str(db)).proposals()}
    assert len(rows) == 3
    for row in rows:
        assert json.loads(row["evidence"]) == stored[int(row["id"])]["evidence"]
    runs = list(csv.DictReader(io.StringIO(invoke("--db", db, "runs", "--csv").output)))
    assert float(runs[0]["seconds_total"]) == Store(str(db)).run(1)["seconds_total"]
    scores = list(csv.DictReader(io.StringIO(invoke("--db", db, "scores", 1, "--csv").output)))
    aggregate = {r["key"]: r for r in Store(str(db)).top_aggregate(1, 10)["harmful"]}
    assert [r["group"] for r in scores].count("harmful") == 10
    assert all(float(r["sum"]) == aggregate[r["key"]]["sum"] for r in scores if r["group"] == "harmful")


def test_renamed_flags_keep_their_old_spelling(db, tmp_path):
    by_new = invoke("--db", db, "scores", 1, "--rank-by", "mean", "--json").output
    assert by_new == invoke("--db", db, "scores", 1, "--by", "mean", "--json").output
    assert invoke("--db", db, "scores", 1, "--by", "max").exit_code == 2  # still checked under its old name
    assert "--rank-by" in invoke("scores", "--help").output and "--by" not in invoke("scores", "--help").output
    for flag, name in (("--note", "v2"), ("--notes", "v3")):
        assert invoke("--db", db, "versions", "add", name, "--parent", "v1", flag, f"via {flag}").exit_code == 0
    assert [v["notes"] for v in Store(str(db)).versions()][1:] == ["via --note", "via --notes"]
    help_text = invoke("export", "--help").output
    assert "--output" in help_text and "-o," not in help_text and "--notes" not in invoke("versions", "add",
                                                                                          "--help").output


@pytest.mark.parametrize("args", [["propose", 1, "--top", 0], ["compare", "v1", "v2", "--top", 0],
                                  ["compare", "v1", "v2", "--top", -1], ["scores", 1, "--top", 0],
                                  ["report", 1, "--top", 0]])
def test_top_below_one_is_the_same_error_everywhere(db, args):
    one_line_error(invoke("--db", db, *args), f"--top must be at least 1, got {args[-1]}")


@pytest.mark.parametrize("path, option", [
    (["run"], "seed"), (["export"], "note"), (["export"], "actor"), (["versions", "add"], "parent"),
    (["versions", "add"], "note"), (["proposals", "list"], "rule"), (["proposals", "list"], "run_id"),
    (["proposals", "list"], "dataset"), (["proposals", "list"], "status"), (["report"], "output"),
    (["demo"], "quiet"), (["demo"], "report_path"), (["report"], "top")])
def test_options_have_help_text(path, option):
    command = cli
    for name in path:
        command = command.commands[name]
    (param,) = [p for p in command.params if p.name == option]
    assert param.help and len(param.help) > 10


def test_runs_is_listed_without_sqlalchemy_alembic_or_numpy(db):
    probe = textwrap.dedent(f"""
        import atexit, sys
        atexit.register(lambda: print(sorted(m for m in ("sqlalchemy", "alembic", "numpy", "torch")
                                              if m in sys.modules), file=sys.stderr))
        sys.argv = ["influence-store", "--db", {str(db)!r}, "runs", "--json"]
        from influence_store.cli import main
        main()
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["id"] == 1 and done.stderr.strip().splitlines()[-1] == "[]"
