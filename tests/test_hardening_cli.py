"""What an adversarial user tried on `run`, `verify`, `export`, `report`, `scores` and `compare`: settings
that used to be replaced silently, a store that names code to run, planted temporary-file links, reads of
an unfinished run, comparisons of incomparable runs, an export that loses a race. Each probe gives one
clear line, exit != 0 and an unchanged store (or the documented behaviour)."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli import store_commands
from influence_store.cli.main import cli
from influence_store.errors import InfluenceStoreError
from influence_store.store import Store
from stored import copy_store

SPEC = '''
import torch
from tasks import small_breast_cancer_task


def small():
    torch.manual_seed(0)
    return small_breast_cancer_task()
'''


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *fragments, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: "), result.output
    if code == 1:
        assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def snapshot(path):
    with sqlite3.connect(path) as connection:
        tables = [t for (t,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(connection.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def sql(path, statement, *args):
    with sqlite3.connect(path) as connection:
        return connection.execute(statement, args).fetchall()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "hard_tasks.py"
    path.write_text(SPEC)
    return f"{path}:small"


@pytest.fixture(scope="module")
def template(spec, tmp_path_factory):
    """A store with one finished exact run of the small task (version v1)."""
    db = tmp_path_factory.mktemp("hard") / "template.db"
    result = invoke("--db", db, "run", spec, "-a", "exact", "-o", "damping", "0.001", "--model-version", "v1",
                    "--test-chunk-size", "6", "--json")
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture
def db(template, tmp_path):
    return copy_store(template, tmp_path / "store.db")


# ---------- settings that were replaced silently ----------

@pytest.mark.parametrize("args, fragment", [
    (["--test-chunk-size", "-1"], "test chunk size must be a positive number"),
    (["--test-chunk-size", "0"], "test chunk size must be a positive number"),
    (["--memory-budget-mb", "-1"], "memory budget must be a positive number"),
    (["--memory-budget-mb", "nan"], "memory budget must be a positive number"),
    (["--model-version", ""], "model version name is empty"),
    (["-o", "damping", "nan"], "invalid value 'nan' for option 'damping'"),
    (["-o", "damping", "inf"], "invalid value 'inf' for option 'damping'"),
    (["--freeze", "regex", "-f", "patterns", "nomatch.*"], "freezing pattern 'nomatch.*' matches no parameter"),
])
def test_run_settings_it_cannot_use_fail_before_anything_is_stored(spec, db, args, fragment):
    before = snapshot(db)
    one_line_error(invoke("--db", db, "run", spec, "-a", "exact", *args), fragment)
    assert snapshot(db) == before


# ---------- a store does not get to run its own code ----------

@pytest.fixture
def planted(db, tmp_path):
    """The run edited to name `subprocess:getoutput` with a command that leaves a marker file; unfinished."""
    marker = tmp_path / "ran"
    sql(db, "UPDATE runs SET task_spec = 'subprocess:getoutput', task_options_json = ?, status = 'failed'",
        json.dumps({"cmd": f"touch {marker}"}))
    return db, marker


def test_verify_and_resume_do_not_import_what_the_store_names(planted, spec):
    db, marker = planted
    sql(db, "INSERT INTO proposals (run_id, example_id, rule, rule_options_json, rank, evidence_json, status, "
            "created_utc, updated_utc) SELECT 1, example_id, 'harmful', '{}', 1, '{}', 'accepted', 'now', 'now' "
            "FROM run_examples WHERE split = 'train' LIMIT 1")
    before = snapshot(db)
    one_line_error(invoke("--db", db, "verify", 1), "task 'subprocess:getoutput'", "verify 1 --task")
    one_line_error(invoke("--db", db, "run", "-", "--resume", 1), "task 'subprocess:getoutput'",
                   "run subprocess:getoutput --resume 1")
    one_line_error(invoke("--db", db, "run", spec, "--resume", 1), "not '")  # a different spec is not a confirmation
    one_line_error(invoke("--db", db, "verify", 1, "--task", spec), "not '")
    assert not marker.exists() and snapshot(db) == before
    with pytest.raises(InfluenceStoreError, match="name the task"):
        from influence_store.curation import verify

        verify(Store(str(db)), 1)
    assert not marker.exists()


def test_a_terminal_user_sees_the_stored_task_and_decides(planted, monkeypatch):
    db, marker = planted
    monkeypatch.setattr(store_commands, "stdin_is_terminal", lambda: True)
    refused = invoke("--db", db, "run", "-", "--resume", 1, input="n\n")
    assert refused.exit_code == 1 and "subprocess:getoutput" in refused.output and not marker.exists()
    invoke("--db", db, "run", "-", "--resume", 1, input="y\n")  # the user said yes: their call
    assert marker.exists()


def test_naming_the_runs_own_task_resumes_and_verifies(db, spec):
    sql(db, "DELETE FROM score_blocks WHERE test_example_id IN (SELECT example_id FROM run_examples "
            "WHERE split = 'test' AND position >= 6)")
    sql(db, "DELETE FROM score_extremes WHERE test_example_id IN (SELECT example_id FROM run_examples WHERE "
            "split = 'test' AND position >= 6)")
    sql(db, "DELETE FROM run_chunks WHERE chunk_index >= 1")
    sql(db, "UPDATE runs SET status = 'failed', chunks_done = 1")
    resumed = ok(invoke("--db", db, "run", spec, "--resume", 1, "--json"))
    assert json.loads(resumed.output)["outcome"] == "resumed"
    one_line_error(invoke("--db", db, "verify", 1, "--task", spec), "no accepted proposals")  # got past loading


# ---------- temporary files ----------

def test_export_and_report_never_write_through_a_planted_tmp_link(db, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = tmp_path / "exp"
    folder.mkdir()
    for name in ("clean.jsonl.tmp", "clean.removals.json.tmp", "r.html.tmp"):
        (folder / name).symlink_to(outside)
    dataset = sql(db, "SELECT name FROM datasets WHERE id = (SELECT train_dataset_id FROM runs)")[0][0]
    ok(invoke("--db", db, "export", "--dataset", dataset, "-o", folder / "clean.jsonl", "--version", "v2"))
    ok(invoke("--db", db, "report", 1, "-o", folder / "r.html"))
    assert outside.read_text() == "keep me"
    assert len((folder / "clean.jsonl").read_text().splitlines()) == 120 and "<html>" in (folder / "r.html").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["clean.jsonl", "clean.jsonl.tmp", "clean.removals.json",
                                                        "clean.removals.json.tmp", "r.html", "r.html.tmp"]


def test_report_needs_force_to_replace_a_file(db, tmp_path):
    target = tmp_path / "old.html"
    target.write_text("mine")
    one_line_error(invoke("--db", db, "report", 1, "-o", target), "exists; pass --force")
    assert target.read_text() == "mine"
    ok(invoke("--db", db, "report", 1, "--output", target, "--force"))
    assert "<html>" in target.read_text()


def test_an_export_that_loses_the_race_leaves_no_files(db, tmp_path, monkeypatch):
    from influence_store import curation

    dataset = sql(db, "SELECT name FROM datasets WHERE id = (SELECT train_dataset_id FROM runs)")[0][0]
    store = Store(str(db))
    store.add_version("v2", parent="v1")  # the other export committed v2 after this one checked the name
    monkeypatch.setattr(store, "versions", lambda: [])
    with pytest.raises(InfluenceStoreError, match="already exists"):
        curation.export(store, dataset, str(tmp_path / "clean.jsonl"), "v2")
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("store.db")] == []


# ---------- reading an unfinished run ----------

def test_scores_of_an_unfinished_run_need_partial_and_say_how_much(db):
    # Stored as running, but no process holds a lease on it: it reads as interrupted.
    sql(db, "UPDATE runs SET status = 'running', chunks_done = 1")
    before = snapshot(db)
    for args in ([], ["--test", "0"]):
        one_line_error(invoke("--db", db, "scores", 1, *args), "run 1 is interrupted, with 1 of 5 test chunks",
                       "--partial")
    partial = CliRunner().invoke(cli, ["--db", str(db), "scores", "1", "--partial", "--json"])
    assert partial.exit_code == 0 and "warning: run 1 is interrupted, with 1 of 5" in partial.stderr
    assert json.loads(partial.stdout)["run_id"] == 1
    for args in (["propose", 1], ["report", 1]):
        assert invoke("--db", db, *args).exit_code == 1
    assert snapshot(db) == before


# ---------- compare ----------

def test_compare_refuses_different_settings_unless_asked_and_the_same_version(db, spec):
    ok(invoke("--db", db, "run", spec, "-a", "exact", "-o", "damping", "0.01", "--model-version", "v2", "--json"))
    one_line_error(invoke("--db", db, "compare", "v1", "v2"), "differ in options", "0.001", "0.01",
                   "--allow-different-settings")
    one_line_error(invoke("--db", db, "compare", "v2", "v2"), "both 'v2'")
    allowed = invoke("--db", db, "compare", "v1", "v2", "--allow-different-settings", "--json")
    assert allowed.exit_code == 0 and "options" in json.loads(allowed.stdout)["settings_differ"][0]
    ok(invoke("--db", db, "run", spec, "-a", "exact", "-o", "damping", "0.001", "--model-version", "v3", "--json"))
    assert json.loads(ok(invoke("--db", db, "compare", "v1", "v3", "--json")).stdout)["settings_differ"] == []
    # v2 now has a run with v1's settings, then a newer one without: compare takes the matching one
    matching = json.loads(ok(invoke("--db", db, "run", spec, "-a", "exact", "-o", "damping", "0.001",
                                    "--model-version", "v2", "--json")).stdout)["run_id"]
    ok(invoke("--db", db, "run", spec, "-a", "exact", "-o", "damping", "0.05", "--model-version", "v2", "--json"))
    compared = json.loads(ok(invoke("--db", db, "compare", "v1", "v2", "--json")).stdout)
    assert (compared["new_run"], compared["settings_differ"]) == (matching, [])


def test_a_checkpoint_that_is_a_device_fails_instead_of_hanging(db):
    sql(db, "UPDATE model_versions SET checkpoint_path = '/dev/zero', checkpoint_sha256 = 'x'")
    command = [str(Path(sys.executable).parent / "influence-store"), "--db", str(db), "compare", "v1", "v2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert done.returncode == 1 and "is not a regular file" in done.stderr and "Traceback" not in done.stderr


# ---------- phases ----------

def test_a_run_names_its_phases_with_elapsed_times(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_STORE_PHASE_SECONDS", "0")  # every phase of this small run counts as long
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "p.db"), "run", spec, "-a", "exact", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    for phase in ("loading task", "preparing exact", "scoring 1 test chunks"):
        assert any(line.startswith(phase) and line.endswith(" s") for line in lines), result.stderr
    assert "stored" in result.stdout and "loading" not in result.stdout


def test_runs_show_prints_mappings_as_json(db):
    shown = ok(invoke("--db", db, "runs", "show", 1)).stdout
    options = next(line for line in shown.splitlines() if line.strip().startswith("options:"))
    assert json.loads(options.split(":", 1)[1])["damping"] == 0.001
