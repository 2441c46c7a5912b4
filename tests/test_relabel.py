"""Relabel as a review outcome, and review decisions as a CSV file, on the bundled noisy digits.

The references are independent of the curation code: the flipped labels themselves (each payload keeps
its ``original_label``), the exported files read back as JSON, the tables read with sqlite3, and test
losses of models retrained from scratch with the example's own ``fit`` on labels fixed by hand.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from contextlib import closing

import pytest
import torch
from click.testing import CliRunner

import influence_store as ist
import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.curation import apply_decisions, propose, review, verify
from influence_store.examples import digits_noisy as digits

SPEC = "influence_store.examples.digits_noisy:task"


@pytest.fixture(scope="module")
def task():
    return ist.load_task(SPEC)


def invoke(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), *map(str, args)])


def true_labels(store, proposals):
    examples = store.examples(p["example_id"] for p in proposals)
    return {p["id"]: examples[p["example_id"]]["payload"]["original_label"] for p in proposals}


def test_relabelling_the_top_self_influence_examples_lowers_the_test_loss_at_least_as_much_as_removing_them(
        digits_store, task):
    store, run_id = digits_store
    top = propose(store, run_id, rule="self-influence", top=20)
    truth = true_labels(store, top)
    assert sum(truth[p["id"]] != p["label"] for p in top) >= 18  # the rule finds flipped labels
    ids = [p["id"] for p in top]

    apply_decisions(store, [(p["id"], "relabel", str(truth[p["id"]]), "true digit") for p in top
                            if truth[p["id"]] != p["label"]] +
                    [(p["id"], "accept", None, "not flipped") for p in top if truth[p["id"]] == p["label"]],
                    actor="ann")
    relabelled = verify(store, run_id, ids, task=task, actor="ann")
    review(store, "revert", ids, actor="ann")
    review(store, "accept", ids, actor="ann")
    removed = verify(store, run_id, ids, task=task, actor="ann")

    # independent: fix the labels by hand, retrain with the example's own fit, evaluate the test loss
    fixed = {p["key"]: truth[p["id"]] for p in top}
    train = [{**e, "label": fixed.get(e["id"], e["label"])} for e in task.train]
    x, y = digits.collate(task.test)
    with torch.no_grad():
        by_hand = float(digits.loss(digits.fit(train), (x, y)).mean())
    assert relabelled["loss_after"] == pytest.approx(by_hand, rel=1e-6)
    assert relabelled["n_relabelled"] == sum(truth[p["id"]] != p["label"] for p in top)
    assert removed["n_removed"] == 20 and removed["n_relabelled"] == 0
    assert relabelled["loss_before"] == pytest.approx(removed["loss_before"])
    print(f"\ntest loss {removed['loss_before']:.5f}: removing the top 20 -> {removed['loss_after']:.5f}, "
          f"relabelling them -> {relabelled['loss_after']:.5f}; accuracy {removed['accuracy_before']:.4f} -> "
          f"{removed['accuracy_after']:.4f} / {relabelled['accuracy_after']:.4f}")
    assert removed["loss_after"] < removed["loss_before"]
    assert relabelled["loss_after"] <= removed["loss_after"]
    stored = {v["id"]: v for v in store.verifications(run_id)}
    assert stored[relabelled["id"]]["n_relabelled"] == relabelled["n_relabelled"]


def test_export_writes_corrected_labels_and_records_them_in_the_manifest(digits_store, tmp_path):
    store, run_id = digits_store
    db = store.location
    first, second = propose(store, run_id, rule="self-influence", top=2)
    truth = true_labels(store, [first, second])
    result = invoke(db, "review", "relabel", first["id"], "--label", truth[first["id"]], "--note", "a real one",
                    "--by", "ann")
    assert result.exit_code == 0, result.output
    assert invoke(db, "review", "accept", second["id"], "--by", "bo").exit_code == 0
    out = tmp_path / "clean.jsonl"
    result = invoke(db, "export", "--dataset", "digits-noisy", "-o", out, "--version", "v2")
    assert result.exit_code == 0, result.output
    assert "1 removed now" in result.output and "1 relabelled now" in result.output

    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    original = {e["id"]: e for e in digits.load_examples()[0]}
    assert len(rows) == len(original) - 1 and second["key"] not in rows
    assert rows[first["key"]] == {**original[first["key"]], "label": truth[first["id"]]}
    unchanged = [k for k in rows if k != first["key"]]
    assert all(rows[k] == original[k] for k in unchanged)
    manifest = json.loads((tmp_path / "clean.removals.json").read_text())
    assert [(r["key"], r["label"], r["new_label"], r["reviewer"], r["note"]) for r in manifest["relabelled"]] == [
        (first["key"], first["label"], truth[first["id"]], "ann", "a real one")]
    assert [r["key"] for r in manifest["removed"]] == [second["key"]]
    with closing(sqlite3.connect(store.path)) as connection:
        events = connection.execute("SELECT to_status, actor, new_label_json, note FROM proposal_events "
                                    "WHERE proposal_id = ? ORDER BY id", (first["id"],)).fetchall()
    assert events[1:] == [("accepted", "ann", json.dumps(truth[first["id"]]), "a real one"),
                          ("applied", events[2][1], json.dumps(truth[first["id"]]),
                           f"exported; relabelled to {truth[first['id']]} in model version v2")]


def test_proposals_csv_round_trips_through_review_import(digits_store, tmp_path):
    store, run_id = digits_store
    db = store.location
    made = propose(store, run_id, rule="self-influence", top=4)
    truth = true_labels(store, made)
    listed = invoke(db, "proposals", "list", "--csv")
    assert listed.exit_code == 0
    path = tmp_path / "decisions.csv"
    path.write_text(listed.output)
    unchanged = invoke(db, "review", "import", path, "--by", "ann")  # as listed: nothing to change
    assert unchanged.exit_code == 0 and unchanged.output.startswith("0 proposals changed")

    rows = list(csv.DictReader(io.StringIO(listed.output)))
    rows[0].update(status="accepted", note="remove it")
    rows[1].update(status="accepted", new_label=str(truth[made[1]["id"]]), note="fix it")
    rows[2].update(status="rejected")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = invoke(db, "review", "import", path, "--by", "ann")
    assert result.exit_code == 0, result.output
    got = {p["id"]: p for p in store.proposals()}
    assert [(got[p["id"]]["status"], got[p["id"]]["outcome"], got[p["id"]]["new_label"], got[p["id"]]["note"])
            for p in made] == [("accepted", "remove", None, "remove it"),
                               ("accepted", "relabel", truth[made[1]["id"]], "fix it"),
                               ("rejected", None, None, None), ("proposed", None, None, None)]
    assert {got[p["id"]]["reviewer"] for p in made[:3]} == {"ann"}

    again = invoke(db, "proposals", "list", "--csv")  # the new listing imports back as a no-op
    path.write_text(again.output)
    assert invoke(db, "review", "import", path).output.startswith("0 proposals changed")

    # by key with an explicit decision column; a bad row stops the whole file, nothing changes
    keyed = tmp_path / "keyed.csv"
    keyed.write_text(f"key,decision,new_label,note\n{made[3]['key']},relabel,{truth[made[3]['id']]},by key\n"
                     f"{made[2]['key']},explode,,\n")
    bad = invoke(db, "review", "import", keyed)
    assert bad.exit_code == 1 and "decision 'explode'" in bad.output and "keyed.csv:3" in bad.output
    assert store.proposals(ids=[made[3]["id"]])[0]["status"] == "proposed"
    keyed.write_text(f"key,decision,new_label,note\n{made[3]['key']},relabel,{truth[made[3]['id']]},by key\n")
    assert invoke(db, "review", "import", keyed).exit_code == 0
    assert store.proposals(ids=[made[3]["id"]])[0]["new_label"] == truth[made[3]["id"]]


@pytest.mark.parametrize("args, message", [
    (["review", "relabel", "1", "--label", "seven"], "is not an int like the current label"),
    (["review", "relabel", "99", "--label", "3"], "no proposal 99"),
    (["review", "import", "missing.csv"], "does not exist"),
])
def test_bad_review_input_is_one_line(digits_store, args, message):
    store, run_id = digits_store
    propose(store, run_id, rule="self-influence", top=1)
    result = invoke(store.location, *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_relabel_to_the_same_label_is_refused(digits_store):
    store, run_id = digits_store
    (made,) = propose(store, run_id, rule="self-influence", top=1)
    result = invoke(store.location, "review", "relabel", made["id"], "--label", made["label"])
    assert result.exit_code == 1 and "is the example's label already" in result.output
