"""Curation through the CLI: the full curation loop, example identity across model versions,
decisions that stick (a rejected proposal is never exported, an applied removal never silently
comes back), and bad input (one line, exit code 1, nothing lost).

One small real task (the bundled noisy-digits example cut to 300 training and 100 test examples:
L2 softmax regression, exact inverse Hessian) is scored once per module; every test works on its own
copy of that store and checks the tables themselves (sqlite3), the exported files, and test losses
recomputed independently by retraining with the example's own ``fit``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
import stored
from influence_store.examples import digits_noisy as digits

N_TRAIN, N_TEST = 300, 100
TRAIN, TEST = (split[:n] for split, n in zip(digits.load_examples(), (N_TRAIN, N_TEST)))

# The task file the CLI runs. ``order=shuffled`` permutes both splits *after* fitting, so the model
# (and therefore every score) is the same as for the original order: only positions change.
TASK_FILE = '''
import random

import influence_store as ist
from influence_store.examples import digits_noisy as digits


def task(train_data=None, order="original"):
    train, test = digits.load_examples()
    train, test = train[:{n_train}], test[:{n_test}]
    if train_data:
        train = digits.read_jsonl(train_data)
    model = digits.fit(train)
    if order == "shuffled":
        rng = random.Random(7)
        train, test = rng.sample(train, len(train)), rng.sample(test, len(test))
    return ist.Task(model=model, loss=digits.loss, train=train, test=test, l2=digits.L2, collate=digits.collate,
                    key=lambda e: e["id"], fit=digits.fit, label=lambda e: e["label"], accuracy=digits.accuracy,
                    name="digits-small")
'''


# ---------- helpers ----------

def invoke(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), *map(str, args)])


def ok(db, *args) -> str:
    result = invoke(db, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def ok_json(db, *args):
    return json.loads(ok(db, *args, "--json"))


def fails(db, *args, match: str) -> str:
    """The command exits 1 with exactly one line on stderr, containing ``match``."""
    result = invoke(db, *args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert match in lines[0], lines[0]
    return lines[0]


def sql(db, query, *params) -> list[tuple]:
    return stored.sql(db, query, *params)


def status_of(db) -> dict[int, str]:
    return dict(sql(db, "SELECT id, status FROM proposals"))


def events(db, proposal_id) -> list[tuple]:
    return sql(db, "SELECT from_status, to_status, actor, note FROM proposal_events WHERE proposal_id = ? "
                   "ORDER BY id", proposal_id)


def key_of(db, proposal_id) -> str:
    return sql(db, "SELECT e.key FROM proposals p JOIN examples e ON e.id = p.example_id WHERE p.id = ?",
               proposal_id)[0][0]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def retrained_test_loss(train_examples) -> tuple[float, torch.nn.Module]:
    """Independent reference: retrain with the example's fit; mean cross-entropy on the test set, and the model."""
    model = digits.fit(train_examples)
    x, y = digits.collate(TEST)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y)), model


# ---------- one scored store per module ----------

@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curation-cli")
    task_file = folder / "digits_small.py"
    task_file.write_text(TASK_FILE.format(n_train=N_TRAIN, n_test=N_TEST))
    spec = f"{task_file}:task"
    db = folder / "scored.db"
    created = ok_json(db, "run", spec, "-a", "exact", "-o", "damping", "0.001", "--model-version", "v1", "--quiet")
    assert created["run_id"] == 1 and created["status"] == "done"
    return SimpleNamespace(db=db, spec=spec)


@pytest.fixture
def s(scored, tmp_path):
    """A private copy of the scored store."""
    db = stored.copy_store(scored.db, tmp_path / "curation.db")
    return SimpleNamespace(db=db, spec=scored.spec, tmp=tmp_path)


def run_again(s, *args) -> dict:
    return ok_json(s.db, "run", s.spec, "-a", "exact", "-o", "damping", "0.001", "--quiet", *args)


# ---------- the full loop ----------

def test_full_loop_run_propose_review_export_version_run_compare_verify(s):
    db = s.db
    proposed = ok_json(db, "propose", 1, "--rule", "harmful", "--top", 6, "--by", "alice")
    ids = [p["id"] for p in proposed]
    assert [p["rank"] for p in proposed] == [1, 2, 3, 4, 5, 6]

    # The evidence is the scores table, aggregated independently here (per train example over the test set).
    expected = sql(db, "SELECT e.key, SUM(sc.score), SUM(sc.score < 0), MIN(sc.score) FROM scores sc "
                       "JOIN examples e ON e.id = sc.train_example_id WHERE sc.run_id = 1 "
                       "GROUP BY e.key ORDER BY SUM(sc.score) LIMIT 6")
    assert [p["key"] for p in proposed] == [row[0] for row in expected]
    for p, (_, total, hurts, lowest) in zip(proposed, expected):
        assert p["evidence"]["sum"] == pytest.approx(total, rel=1e-9) and total < 0
        assert p["evidence"]["hurts"] == hurts and p["evidence"]["most_negative"] == pytest.approx(lowest)
        assert p["evidence"]["predicted_loss_change"] == pytest.approx(total / N_TEST / N_TRAIN, rel=1e-9)
        assert p["evidence"]["n_test"] == N_TEST and "train_loss" in p["evidence"]
    assert events(db, ids[0]) == [(None, "proposed", "alice", "rule harmful")]

    # Review: accept three, reject one, accept-then-revert one, leave one proposed.
    ok(db, "review", "accept", *ids[:3], "--note", "label looks wrong", "--by", "alice")
    ok(db, "review", "reject", ids[3], "--note", "a real 7", "--by", "bob")
    ok(db, "review", "accept", ids[4], "--by", "bob")
    ok(db, "review", "revert", ids[4], "--note", "second thoughts", "--by", "bob")
    assert status_of(db) == {ids[0]: "accepted", ids[1]: "accepted", ids[2]: "accepted", ids[3]: "rejected",
                             ids[4]: "proposed", ids[5]: "proposed"}
    assert events(db, ids[0])[1:] == [("proposed", "accepted", "alice", "label looks wrong")]
    assert events(db, ids[4])[1:] == [("proposed", "accepted", "bob", None),
                                      ("accepted", "proposed", "bob", "second thoughts")]
    assert all(t for (t,) in sql(db, "SELECT created_utc FROM proposal_events"))
    assert [p["id"] for p in ok_json(db, "proposals", "list", "--status", "accepted")] == ids[:3]
    assert [p["id"] for p in ok_json(db, "proposals", "list", "--status", "rejected")] == [ids[3]]
    assert [p["id"] for p in ok_json(db, "proposals", "list", "--rule", "harmful", "--run", 1)] == ids
    assert [p["id"] for p in ok_json(db, "proposals", "list", "--dataset", "digits-small")] == ids
    assert ok_json(db, "proposals", "list", "--rule", "self-influence") == []
    shown = ok_json(db, "proposals", "show", ids[3])
    assert shown["reviewer"] == "bob" and shown["note"] == "a real 7" and len(shown["events"]) == 2
    assert shown["example"]["id"] == proposed[3]["key"]
    assert "a real 7" in ok(db, "proposals", "show", ids[3])

    # Export: the training set minus the three accepted removals, in the original order.
    clean = s.tmp / "clean.jsonl"
    exported = ok_json(db, "export", "--dataset", "digits-small", "-o", clean, "--version", "v2", "--by", "carol")
    assert exported["kept"] == N_TRAIN - 3 and exported["removed_now"] == 3 and exported["parent"] == "v1"
    removed_keys = [p["key"] for p in proposed[:3]]
    assert read_jsonl(clean) == [e for e in TRAIN if e["id"] not in removed_keys]
    manifest = json.loads((s.tmp / "clean.removals.json").read_text())
    assert [r["proposal_id"] for r in manifest["removed"]] == ids[:3]
    assert [r["key"] for r in manifest["removed"]] == removed_keys
    assert manifest["version"] == "v2" and manifest["parent"] == "v1" and manifest["kept"] == N_TRAIN - 3
    assert manifest["removed"][0]["payload"] == next(e for e in TRAIN if e["id"] == removed_keys[0])

    versions = {name: (vid, parent) for vid, name, parent in sql(db, "SELECT id, name, parent_id FROM model_versions")}
    assert versions["v2"][1] == versions["v1"][0]
    assert sql(db, "SELECT id, applied_version_id FROM proposals WHERE status = 'applied' ORDER BY id") == \
        [(i, versions["v2"][0]) for i in ids[:3]]
    assert events(db, ids[0])[-1][:3] == ("accepted", "applied", "carol")
    assert status_of(db)[ids[3]] == "rejected"

    # Retrain on the export as v2, register its checkpoint, and compare the two versions.
    second = run_again(s, "--train-data", clean, "--model-version", "v2")
    assert sql(db, "SELECT r.n_train, r.n_test, v.name FROM runs r JOIN model_versions v ON v.id = r.model_version_id "
                   "WHERE r.id = ?", second["run_id"]) == [(N_TRAIN - 3, N_TEST, "v2")]
    loss_old, _ = retrained_test_loss(TRAIN)
    loss_new, model_v2 = retrained_test_loss(read_jsonl(clean))
    checkpoint = s.tmp / "v2.pt"
    torch.save(model_v2.state_dict(), checkpoint)
    registered = ok_json(db, "versions", "add", "v2", "--checkpoint", checkpoint)
    assert registered["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert {v["name"]: v["runs"] for v in ok_json(db, "versions", "list")} == {"v1": 1, "v2": 1}

    compared = ok_json(db, "compare", "v1", "v2", "--top", N_TRAIN)
    assert (compared["old_run"], compared["new_run"]) == (1, second["run_id"])
    assert (compared["n_train_old"], compared["n_train_new"], compared["n_common_train"]) == (300, 297, 297)
    assert compared["n_common_test"] == N_TEST
    assert [r["proposal_id"] for r in compared["removed"]] == ids[:3]
    predicted = sum(p["evidence"]["predicted_loss_change"] for p in proposed[:3])
    assert compared["predicted_loss_change"] == pytest.approx(predicted, rel=1e-9)
    assert compared["test_loss_old"] == pytest.approx(loss_old, rel=1e-6)
    assert compared["test_loss_new"] == pytest.approx(loss_new, rel=1e-6)
    assert compared["actual_loss_change"] == pytest.approx(loss_new - loss_old, rel=1e-5)
    assert compared["actual_loss_change"] < 0 and compared["predicted_loss_change"] < 0
    # Movers are joined by key: each score is that key's mean score in its own run.
    means = {run: dict(sql(db, "SELECT e.key, AVG(sc.score) FROM scores sc JOIN examples e ON e.id = "
                               "sc.train_example_id WHERE sc.run_id = ? GROUP BY e.key", run)) for run in (1, 2)}
    assert len(compared["movers"]) == N_TRAIN - 3
    for mover in compared["movers"]:
        assert mover["score_old"] == pytest.approx(means[1][mover["key"]], rel=1e-9)
        assert mover["score_new"] == pytest.approx(means[2][mover["key"]], rel=1e-9)
    assert "removals applied in v2: 3" in ok(db, "compare", "v1", "v2")

    # Verify retrains without the removals and stores predicted vs actual with them.
    verified = ok_json(db, "verify", 1, "--task", s.spec)  # a store's task is loaded only when named
    assert verified["proposal_ids"] == ids[:3] and verified["n_removed"] == 3
    assert verified["actual_loss_change"] == pytest.approx(compared["actual_loss_change"], rel=1e-6)
    assert verified["predicted_loss_change"] == pytest.approx(predicted, rel=1e-9)
    assert sql(db, "SELECT run_id, proposal_ids_json, n_removed FROM verifications") == [(1, json.dumps(ids[:3]), 3)]
    (stored,) = sql(db, "SELECT predicted_loss_change, actual_loss_change, accuracy_before, accuracy_after "
                        "FROM verifications")
    assert stored[:2] == pytest.approx((predicted, loss_new - loss_old), rel=1e-5)
    assert 0.5 < stored[2] <= 1 and 0.5 < stored[3] <= 1

    # The registered checkpoint changes on disk: compare refuses, and the recorded hash stays.
    checkpoint.write_bytes(checkpoint.read_bytes() + b"tampered")
    fails(db, "compare", "v1", "v2", match="changed since it was registered")
    assert sql(db, "SELECT checkpoint_sha256 FROM model_versions WHERE name = 'v2'") == \
        [(registered["checkpoint_sha256"],)]


# ---------- identity across versions ----------

def test_shuffled_training_order_still_compares_by_identity(s):
    db = s.db
    shuffled = run_again(s, "-t", "order", "shuffled", "--model-version", "v1-shuffled")
    order = {run: [k for (k,) in sql(db, "SELECT e.key FROM run_examples re JOIN examples e ON e.id = re.example_id "
                                         "WHERE re.run_id = ? AND re.split = 'train' ORDER BY re.position", run)]
             for run in (1, shuffled["run_id"])}
    assert sorted(order[1]) == sorted(order[2])
    assert sum(a != b for a, b in zip(order[1], order[2])) > 0.9 * N_TRAIN  # positions really moved
    assert sql(db, "SELECT count(*) FROM examples") == [(N_TRAIN + N_TEST,)]  # same rows, not new ones

    # Same model, so every (test example, train example) score is the same when joined by example.
    pairs = sql(db, "SELECT a.score, b.score FROM scores a JOIN scores b ON a.test_example_id = b.test_example_id "
                    "AND a.train_example_id = b.train_example_id WHERE a.run_id = 1 AND b.run_id = 2")
    assert len(pairs) == N_TRAIN * N_TEST
    assert max(abs(a - b) for a, b in pairs) < 1e-8 * max(abs(a) for a, _ in pairs)

    compared = ok_json(db, "compare", "v1", "v1-shuffled", "--top", N_TRAIN)
    assert compared["n_common_train"] == N_TRAIN and compared["n_common_test"] == N_TEST
    assert compared["removed"] == [] and compared["actual_loss_change"] == pytest.approx(0, abs=1e-9)
    assert len(compared["movers"]) == N_TRAIN
    for mover in compared["movers"]:
        assert mover["rank_change"] == 0 and mover["rank_old"] == mover["rank_new"]
        assert mover["score_new"] == pytest.approx(mover["score_old"], rel=1e-8, abs=1e-12)


# ---------- decisions that stick ----------

def test_rejected_or_reverted_proposals_are_never_exported(s, monkeypatch):
    db = s.db
    monkeypatch.setenv("INFLUENCE_STORE_USER", "dana")  # the default reviewer when --by is not given
    ids = [p["id"] for p in ok_json(db, "propose", 1, "--rule", "self-influence", "--top", 4)]
    ok(db, "review", "accept", ids[0], ids[1])
    ok(db, "review", "reject", ids[2], "--note", "label is right")
    ok(db, "review", "accept", ids[3])
    ok(db, "review", "reject", ids[3], "--note", "changed my mind")  # accepted -> rejected before export
    keys = {i: key_of(db, i) for i in ids}
    first = ok_json(db, "export", "--dataset", "digits-small", "-o", s.tmp / "a.jsonl", "--version", "v2")
    assert first["removed_now"] == 2
    exported = {e["id"] for e in read_jsonl(s.tmp / "a.jsonl")}
    assert keys[ids[2]] in exported and keys[ids[3]] in exported
    assert keys[ids[0]] not in exported and keys[ids[1]] not in exported and len(exported) == N_TRAIN - 2
    manifest = json.loads((s.tmp / "a.removals.json").read_text())
    assert {r["proposal_id"] for r in manifest["removed"]} == {ids[0], ids[1]}
    assert [status_of(db)[i] for i in ids] == ["applied", "applied", "rejected", "rejected"]
    assert events(db, ids[2])[-1] == ("proposed", "rejected", "dana", "label is right")

    # A second export keeps earlier removals out and still exports the rejected examples.
    second = ok_json(db, "export", "--dataset", "digits-small", "-o", s.tmp / "b.jsonl", "--version", "v3",
                     "--parent", "v2")
    assert (second["removed_now"], second["removed_before"]) == (0, 2)
    assert {e["id"] for e in read_jsonl(s.tmp / "b.jsonl")} == exported


def test_an_applied_removal_cannot_be_silently_readded(s):
    db = s.db
    ids = [p["id"] for p in ok_json(db, "propose", 1, "--top", 3)]
    ok(db, "review", "accept", ids[0], ids[1])
    ok(db, "export", "--dataset", "digits-small", "-o", s.tmp / "clean.jsonl", "--version", "v2")
    before = sql(db, "SELECT id, status FROM runs"), status_of(db), sql(db, "SELECT count(*) FROM proposal_events")

    # The uncurated data under the curated version, or under a new name, is refused ...
    line = fails(db, "run", s.spec, "-a", "exact", "-o", "damping", "0.001", "--model-version", "v2", "--quiet",
                 match="--allow-removed")
    assert "2 training examples" in line and (key_of(db, ids[0]) in line or key_of(db, ids[1]) in line)
    fails(db, "run", s.spec, "-a", "exact", "-o", "damping", "0.001", "--model-version", "v3", "--quiet",
          match="removed by applied proposals")
    # ... the decision cannot be undone by review, and propose does not bring the examples back ...
    fails(db, "review", "revert", ids[0], match="applied removals are final")
    fails(db, "review", "reject", ids[1], match="applied removals are final")
    again = ok_json(db, "propose", 1, "--top", N_TRAIN)
    assert {p["example_id"] for p in again}.isdisjoint(
        {e for (e,) in sql(db, f"SELECT example_id FROM proposals WHERE id IN ({ids[0]}, {ids[1]}, {ids[2]})")})
    assert (sql(db, "SELECT id, status FROM runs"), {i: status_of(db)[i] for i in ids}) == \
        (before[0], {i: before[1][i] for i in ids})

    # ... and re-scoring the original version (which did contain them) is still allowed: it is run 1.
    assert run_again(s)["run_id"] == 1
    # --allow-removed is the explicit override.
    forced = run_again(s, "--model-version", "v2", "--allow-removed")
    assert sql(db, "SELECT n_train, status FROM runs WHERE id = ?", forced["run_id"]) == [(N_TRAIN, "done")]
    assert [status_of(db)[i] for i in ids[:2]] == ["applied", "applied"]


# ---------- bad input: one line, exit 1, nothing lost ----------

def test_reviewing_unknown_or_applied_proposals_changes_nothing(s, monkeypatch):
    db = s.db
    monkeypatch.delenv("INFLUENCE_STORE_USER", raising=False)  # the reviewer defaults to the OS user
    ids = [p["id"] for p in ok_json(db, "propose", 1, "--top", 3)]
    fails(db, "review", "accept", ids[0], 999, match="no proposal 999")
    assert set(status_of(db).values()) == {"proposed"}  # all or none: the valid id did not change either
    assert sql(db, "SELECT count(*) FROM proposal_events") == [(3,)]
    ok(db, "review", "accept", ids[0], ids[0])  # a repeated id is one decision
    assert events(db, ids[0])[1:] == [("proposed", "accepted", getpass.getuser(), None)]
    ok(db, "export", "--dataset", "digits-small", "-o", s.tmp / "clean.jsonl", "--version", "v2")
    n_events = sql(db, "SELECT count(*) FROM proposal_events")
    fails(db, "review", "accept", ids[0], match=f"proposal {ids[0]} is applied")
    fails(db, "review", "reject", ids[1], ids[0], match=f"proposal {ids[0]} is applied")
    assert status_of(db) == {ids[0]: "applied", ids[1]: "proposed", ids[2]: "proposed"}
    assert sql(db, "SELECT count(*) FROM proposal_events") == n_events


def test_export_over_an_existing_file_needs_force(s):
    db = s.db
    ids = [p["id"] for p in ok_json(db, "propose", 1, "--top", 2)]
    ok(db, "review", "accept", *ids)
    target, manifest = s.tmp / "clean.jsonl", s.tmp / "clean.removals.json"
    target.write_text("precious\n")
    fails(db, "export", "--dataset", "digits-small", "-o", target, "--version", "v2", match="--force")
    assert target.read_text() == "precious\n" and not manifest.exists()
    assert [n for (n,) in sql(db, "SELECT name FROM model_versions")] == ["v1"]
    assert set(status_of(db).values()) == {"accepted"}

    target.unlink()
    manifest.write_text("{}")  # an old manifest is protected too
    fails(db, "export", "--dataset", "digits-small", "-o", target, "--version", "v2", match="--force")
    assert manifest.read_text() == "{}" and not target.exists()

    ok(db, "export", "--dataset", "digits-small", "-o", target, "--version", "v2", "--force")
    assert len(read_jsonl(target)) == N_TRAIN - 2 and set(status_of(db).values()) == {"applied"}


def test_compare_versions_without_runs_is_one_line(s):
    db = s.db
    ok(db, "versions", "add", "v9", "--parent", "v1")
    started = time.perf_counter()
    fails(db, "compare", "v1", "v9", match="model version 'v9' has no finished run")
    fails(db, "compare", "v9", "v1", match="model version 'v9' has no finished run")
    fails(db, "compare", "v1", "nope", match="no model version 'nope'")
    fails(db, "compare", "v1", "v9", "--old-run", 7, match="no run 7")
    assert time.perf_counter() - started < 30  # a nested transaction used to wait 60 s for its own lock
    assert sql(db, "SELECT name FROM model_versions ORDER BY id") == [("v1",), ("v9",)]


def test_a_checkpoint_changed_since_registration_is_refused(s):
    db = s.db
    checkpoint = s.tmp / "v9.pt"
    checkpoint.write_bytes(b"weights v9")
    ok(db, "versions", "add", "v9", "--parent", "v1", "--checkpoint", checkpoint)
    sha = hashlib.sha256(b"weights v9").hexdigest()
    assert sql(db, "SELECT checkpoint_sha256, checkpoint_path FROM model_versions WHERE name = 'v9'") == \
        [(sha, str(checkpoint.resolve()))]
    checkpoint.write_bytes(b"weights v9, retrained in place")
    fails(db, "compare", "v1", "v9", match=f"checkpoint '{checkpoint.resolve()}' of model version 'v9' changed")
    fails(db, "versions", "add", "v9", "--checkpoint", checkpoint, match="already exists with a checkpoint")
    assert sql(db, "SELECT checkpoint_sha256 FROM model_versions WHERE name = 'v9'") == [(sha,)]
    fails(db, "versions", "add", "v10", "--checkpoint", s.tmp / "missing.pt", match="is not a file")


@pytest.mark.parametrize("args, match", [
    (["propose", 7], "no run 7"),
    (["propose", 1, "--rule", "nope"], "nope"),
    (["propose", 1, "-o", "bogus", "1"], "bogus"),
    (["propose", 1, "-o", "by", "median"], "median"),
    (["propose", 1, "--top", 0], "--top must be at least 1"),
    (["proposals", "show", 42], "no proposal 42"),
    (["export", "--dataset", "nope", "-o", "{tmp}/x.jsonl", "--version", "v2"], "no dataset 'nope'"),
    (["export", "--dataset", "digits-small", "-o", "{tmp}/x.jsonl", "--version", "v1"], "'v1' already exists"),
    (["export", "--dataset", "digits-small", "-o", "{tmp}/no/x.jsonl", "--version", "v2"], "does not exist"),
    (["verify", 1], "no accepted proposals"),
    (["versions", "add", "v1"], "already exists"),
    (["versions", "add", "v5", "--parent", "nope"], "parent version 'nope' does not exist"),
])
def test_other_bad_curation_input_is_one_line(s, args, match):
    before = sql(s.db, "SELECT count(*) FROM proposals"), sql(s.db, "SELECT count(*) FROM model_versions")
    fails(s.db, *[str(a).format(tmp=s.tmp) for a in args], match=match)
    assert (sql(s.db, "SELECT count(*) FROM proposals"), sql(s.db, "SELECT count(*) FROM model_versions")) == before
