"""Curation: stored scores -> removal proposals (rule plugins) -> review -> export -> compare/verify.

Every decision is recorded in the store with who made it, when and why. Removals are proposed
only for training examples, and an applied removal is final: it cannot quietly come back. A proposal
can also be accepted as a relabel (a corrected label instead of a removal): export then writes the
example with its new label, and verify retrains with it.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import InfluenceStoreError
from .files import check_output_path, write_temp_beside
from .options import NoOptions, options_to_dict, parse_options

if TYPE_CHECKING:  # the proposal_rules plugin imports this module at startup; SQLAlchemy loads on use
    from .store import Store

REVIEW_TRANSITIONS = {
    "accept": {"proposed": "accepted", "rejected": "accepted"},
    "reject": {"proposed": "rejected", "accepted": "rejected"},
    "revert": {"accepted": "proposed", "rejected": "proposed"},
    "relabel": {"proposed": "accepted", "rejected": "accepted", "accepted": "accepted"},
}


def current_user() -> str:
    """The default reviewer: $INFLUENCE_STORE_USER, else the OS user."""
    try:
        return os.environ.get("INFLUENCE_STORE_USER") or getpass.getuser()
    except Exception:  # no user database entry (e.g. some containers)
        return "unknown"


class ProposalRule:
    """Base for proposal rule plugins.

    ``candidates(store, run)`` returns training examples as (example id, evidence dict), best
    candidate first; evidence holds the numbers that justify the removal.
    """

    name: str = ""
    Options = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def candidates(self, store: Store, run: dict) -> list[tuple[int, dict]]:  # pragma: no cover - interface
        raise NotImplementedError


def propose(store: Store, run_id: int, rule: str = "harmful", top: int = 50, options: dict | None = None,
            actor: str | None = None) -> list[dict]:
    """Create up to ``top`` proposals from a finished run; examples already proposed, accepted or
    removed in this dataset are skipped."""
    from .plugin_manager import lookup

    if top < 1:
        raise InfluenceStoreError("{top} must be at least 1, got {value}", top="top", value=top)
    run = store.run(run_id)
    if run["status"] != "done":
        raise InfluenceStoreError("run {run_id} is {status}; finish it first ({resume})", run_id=run_id,
                                  status=run["status"], resume=f"execute_run(store, TASK, resume={run_id})")
    entry = lookup("register_proposal_rules", rule)
    parsed = parse_options(entry.options_cls, options, f"proposal rule {rule!r}")
    taken = store.open_removals(run["train_dataset_id"])
    chosen = [(e, ev) for e, ev in entry.cls(parsed).candidates(store, run) if e not in taken][:top]
    ids = store.add_proposals(run["id"], rule, options_to_dict(parsed), chosen, actor or current_user())
    return store.proposals(ids=ids)


def review(store: Store, action: str, ids: Sequence[int], note: str | None = None, actor: str | None = None,
           new_label: Any = None) -> list[dict]:
    """accept, reject, revert or relabel proposals (all or none), recording reviewer, time and note.
    ``relabel`` needs ``new_label`` (text is read as the type of the example's current label)."""
    if action not in REVIEW_TRANSITIONS:
        raise InfluenceStoreError(f"unknown review action {action!r}; use one of {', '.join(REVIEW_TRANSITIONS)}")
    if not ids:
        raise InfluenceStoreError("give at least one proposal id")
    ids = list(dict.fromkeys(ids))  # `review accept 3 3` is one decision, not a second transition that fails
    decisions = [(pid, action, new_label, note) for pid in ids]
    apply_decisions(store, decisions, actor)
    return store.proposals(ids=ids)


def apply_decisions(store: Store, decisions: Sequence[tuple[int, str, Any, str | None]],
                    actor: str | None = None) -> list[dict]:
    """(proposal id, action, new label, note) decisions, checked and then stored all or none."""
    known = {p["id"]: p for p in store.proposals(ids=[d[0] for d in decisions])}
    rows = []
    for pid, action, new_label, note in decisions:
        if action not in REVIEW_TRANSITIONS:
            raise InfluenceStoreError(f"unknown review action {action!r} for proposal {pid}; use one of "
                                      f"{', '.join(REVIEW_TRANSITIONS)}")
        if pid not in known:
            raise InfluenceStoreError("no proposal {pid}; see {proposals_list}", pid=pid,
                                      proposals_list="store.proposals()")
        if action == "relabel":
            if new_label is None or new_label == "":
                raise InfluenceStoreError(f"relabelling proposal {pid} needs the new label")
            new_label = parse_label(new_label, known[pid]["label"])
            if new_label == known[pid]["label"]:
                raise InfluenceStoreError(f"proposal {pid}: the new label {new_label!r} is the example's label "
                                          f"already; accept or reject it instead")
        elif new_label not in (None, ""):
            raise InfluenceStoreError(f"proposal {pid}: a new label goes with relabel, not {action}")
        else:
            new_label = None
        rows.append((pid, REVIEW_TRANSITIONS[action], note, new_label))
    return store.decide(rows, actor or current_user())


def parse_label(value: Any, like: Any) -> Any:
    """A label given as text, read as the type of the example's current label (int, float, bool, text)."""
    if not isinstance(value, str) or like is None or isinstance(like, str):
        return value
    text = value.strip()
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        kind = type(like).__name__
        raise InfluenceStoreError(f"new label {value!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} like the "
                                  f"current label {like!r}; give a label of the same kind") from None
    try:
        return json.loads(text)
    except ValueError:
        return text


def export(store: Store, dataset: str, output: str, version: str, parent: str | None = None, force: bool = False,
           actor: str | None = None, note: str | None = None) -> dict:
    """Write the training set minus accepted (and earlier applied) removals as JSON lines, plus a
    removals manifest, then mark the accepted proposals applied in the new model version."""
    from .curation_store import check_version_name

    check_version_name(version)  # before any file is written
    out = Path(output)
    manifest = out.with_name(out.name.removesuffix(".jsonl") + ".removals.json")
    for path in (out, manifest):
        check_output_path(path)
        if path.exists() and not force:
            raise InfluenceStoreError("{path!r} exists; pass {force} to overwrite it", path=str(path),
                                      force="force=True")
    run = store.latest_train_run(dataset)
    parent = parent or run["model_version"]
    store.version(parent)
    if any(v["name"] == version for v in store.versions()):
        raise InfluenceStoreError("model version {version!r} already exists; name the new version with {new_version}",
                                  version=version, new_version='version="NEW"')
    from .task import with_label

    accepted = store.proposals(status="accepted", dataset=dataset)
    applied = store.proposals(status="applied", dataset=dataset)
    removed_ids = {p["example_id"] for p in accepted + applied if p["outcome"] == "remove"}
    new_labels = {p["example_id"]: p["new_label"] for p in accepted + applied if p["outcome"] == "relabel"}
    train = store.run_examples(run["id"], "train")
    examples = store.examples(train)
    kept = [with_label(examples[e]["payload"], new_labels[e]) if e in new_labels else examples[e]["payload"]
            for e in train if e not in removed_ids]
    entries = {"remove": [], "relabel": []}
    for p in accepted + applied:
        entries[p["outcome"]].append({
            "proposal_id": p["id"], "key": p["key"], "label": p["label"], "rule": p["rule"],
            **({"new_label": p["new_label"]} if p["outcome"] == "relabel" else {}),
            "evidence": p["evidence"], "reviewer": p["reviewer"], "note": p["note"],
            "status": "applied" if p["status"] == "accepted" else "applied earlier",
            "payload": examples[p["example_id"]]["payload"] if p["example_id"] in examples else None})
    # Both files are written aside first and appear only once the new version is committed: an export
    # that loses a race (or fails) leaves no data file or manifest for a version that does not exist.
    staged = []
    try:
        staged.append(write_temp_beside(out, "".join(json.dumps(payload) + "\n" for payload in kept)))
        staged.append(write_temp_beside(manifest, json.dumps({
            "dataset": dataset, "version": version, "parent": parent, "source_run": run["id"], "kept": len(kept),
            "removed": entries["remove"], "relabelled": entries["relabel"]}, indent=2)))
        store.apply_removals([p["id"] for p in accepted], version, parent, dataset, actor or current_user(), note)
    except BaseException:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise
    os.replace(staged[0], out)
    os.replace(staged[1], manifest)
    now = sum(p["outcome"] == "relabel" for p in accepted)
    before = sum(p["outcome"] == "relabel" for p in applied)
    return {"output": str(out), "manifest": str(manifest), "version": version, "parent": parent,
            "kept": len(kept), "removed_now": len(accepted) - now, "removed_before": len(applied) - before,
            "relabelled_now": now, "relabelled_before": before}


def compare(store: Store, old: str, new: str, old_run: int | None = None, new_run: int | None = None,
            top: int = 20, allow_different_settings: bool = False) -> dict:
    """How scores and ranks moved between two model versions (joined by example identity), which
    removals were applied, and predicted vs actual change of the mean test loss. Runs made with
    different approximators, options or freezing give scores on different scales: refused unless allowed."""
    if old == new:
        raise InfluenceStoreError(f"old and new are both {old!r}; compare two different model versions")
    for version in (old, new):
        check_checkpoint(store, version)
    a, b = store.latest_done_run(old, old_run), store.latest_done_run(new, new_run)
    if new_run is None and settings_differences(a, b):  # another finished run of new may match old's settings
        b = next((r for r in reversed(store.runs(new, status="done")) if not settings_differences(a, r)), b)
    differ = settings_differences(a, b)
    if differ and not allow_different_settings:
        raise InfluenceStoreError(f"runs {a['id']} ({old}) and {b['id']} ({new}) differ in {'; '.join(differ)}, so "
                                  f"their scores and predictions are not comparable; run {new} with {old}'s settings")
    agg_a = {r["example_id"]: r for r in store.aggregate_scores(a["id"])}
    agg_b = {r["example_id"]: r for r in store.aggregate_scores(b["id"])}
    rank_a = {e: i for i, e in enumerate(sorted(agg_a, key=lambda e: agg_a[e]["mean"]), start=1)}
    rank_b = {e: i for i, e in enumerate(sorted(agg_b, key=lambda e: agg_b[e]["mean"]), start=1)}
    common = [e for e in agg_a if e in agg_b]
    movers = sorted(common, key=lambda e: abs(rank_a[e] - rank_b[e]), reverse=True)[:top]
    test_a, test_b = store.run_examples(a["id"], "test"), store.run_examples(b["id"], "test")
    common_test = [e for e in test_a if e in test_b]
    if not common_test:
        raise InfluenceStoreError(f"runs {a['id']} and {b['id']} share no test examples; compare runs on the same "
                                  f"test set")
    loss_a = sum(test_a[e]["loss"] for e in common_test) / len(common_test)
    loss_b = sum(test_b[e]["loss"] for e in common_test) / len(common_test)
    applied = store.proposals(status="applied", applied_version=new)
    removed = [p for p in applied if p["outcome"] == "remove"]
    relabelled = [p for p in applied if p["outcome"] == "relabel"]
    # influence of a removal is in the stored scores; a relabel's (a new example's gradient) is not
    predicted = sum(agg_a[p["example_id"]]["predicted_loss_change"] for p in removed if p["example_id"] in agg_a)
    examples = store.examples(movers)
    return {
        "old": old, "new": new, "old_run": a["id"], "new_run": b["id"],
        "n_train_old": a["n_train"], "n_train_new": b["n_train"], "n_common_train": len(common),
        "n_common_test": len(common_test),
        "removed": [{"proposal_id": p["id"], "key": p["key"], "rule": p["rule"],
                     "predicted_loss_change": agg_a.get(p["example_id"], {}).get("predicted_loss_change")}
                    for p in removed],
        "relabelled": [{"proposal_id": p["id"], "key": p["key"], "rule": p["rule"], "label": p["label"],
                        "new_label": p["new_label"]} for p in relabelled],
        "settings_differ": differ, "predicted_loss_change": predicted, "test_loss_old": loss_a, "test_loss_new": loss_b,
        "actual_loss_change": loss_b - loss_a,
        "movers": [{"key": examples[e]["key"], "score_old": agg_a[e]["mean"], "score_new": agg_b[e]["mean"],
                    "rank_old": rank_a[e], "rank_new": rank_b[e], "rank_change": rank_b[e] - rank_a[e]}
                   for e in movers],
    }


COMPARED_SETTINGS = ("approximator", "options", "freeze", "freeze_options", "effective_damping", "sign_convention")


def settings_differences(a: dict, b: dict) -> list[str]:
    """What two runs were computed with differently, as 'name OLD vs NEW' lines."""
    differ = [f"{name} {json.dumps(a[name])} vs {json.dumps(b[name])}" for name in COMPARED_SETTINGS
              if a.get(name) != b.get(name)]
    dtypes = (a["settings"].get("dtype"), b["settings"].get("dtype"))
    return differ + ([f"dtype {dtypes[0]} vs {dtypes[1]}"] if dtypes[0] != dtypes[1] else [])


def check_checkpoint(store: Store, version: str) -> None:
    """A registered checkpoint must still have the hash recorded at registration."""
    info = store.version(version)
    if info["checkpoint_path"] and info["checkpoint_sha256"]:
        path = Path(info["checkpoint_path"])
        if path.exists() and not path.is_file():  # a device or pipe (/dev/zero) would be read forever
            raise InfluenceStoreError(f"checkpoint {str(path)!r} of model version {version!r} is not a regular file; "
                                      f"register the saved model file as a new version")
        if not path.exists():
            raise InfluenceStoreError(f"checkpoint {str(path)!r} of model version {version!r} is missing; restore it "
                                      f"or register the model again as a new version")
        if file_sha256(path) != info["checkpoint_sha256"]:
            raise InfluenceStoreError(f"checkpoint {str(path)!r} of model version {version!r} changed since it was "
                                      f"registered; register the new file as a new version")


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_version(store: Store, name: str, parent: str | None = None, checkpoint: str | None = None,
                dataset: str | None = None, notes: str | None = None) -> dict:
    """Register a model version; a version created by ``export`` gets its checkpoint here."""
    sha = None
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise InfluenceStoreError(f"checkpoint {checkpoint!r} is not a file; give the saved model file")
        sha = file_sha256(checkpoint)
        checkpoint = str(Path(checkpoint).resolve())
    if any(v["name"] == name for v in store.versions()):
        if checkpoint is None:
            raise InfluenceStoreError(f"model version {name!r} already exists; choose a new name")
        return store.set_checkpoint(name, checkpoint, sha, notes)
    return store.add_version(name, parent=parent, checkpoint_path=checkpoint, checkpoint_sha256=sha,
                             dataset=dataset, notes=notes)


def verify(store: Store, run_id: int, proposal_ids: Sequence[int] | None = None, task=None,
           actor: str | None = None, task_spec: str | None = None, task_options: dict | None = None,
           phases=None) -> dict:
    """Retrain without the run's accepted (or given) removals; store predicted vs actual change of the
    mean test loss (and accuracy when the task defines it). Needs a task with ``fit``: ``task`` itself, or
    ``task_spec``, which must name the run's own task (a store's code is never loaded unasked)."""
    from .phases import QUIET
    from .task import example_rows
    from .task import load_task
    from .trust import stored_task

    phases = phases or QUIET

    started = time.perf_counter()
    run = store.run(run_id)
    if proposal_ids:
        chosen = store.proposals(ids=proposal_ids)
        missing = set(proposal_ids) - {p["id"] for p in chosen}
        if missing:
            raise InfluenceStoreError("no proposal {pid}; see {proposals_list}", pid=sorted(missing)[0],
                                      proposals_list="store.proposals()")
        wrong = [p["id"] for p in chosen if p["run_id"] != run["id"]]
        if wrong:
            raise InfluenceStoreError(f"proposal {wrong[0]} belongs to another run; verify it with its own run")
    else:
        chosen = [p for p in store.proposals(run_id=run["id"]) if p["status"] in ("accepted", "applied")]
    if not chosen:
        raise InfluenceStoreError(f"run {run_id} has no accepted proposals to verify; accept some or pass their ids")
    if task is None:
        spec, options = stored_task(run, task_spec, task_options)
        with phases.step(f"loading task {spec}"):
            task = load_task(spec, options)
    if task.fit is None:
        raise InfluenceStoreError("the task has no fit(examples) function, so it cannot be retrained; add one to "
                                  "verify")
    ids = store.example_ids(run["id"], "train")
    stored = {r[0]: r for r in example_rows(task, "train")}
    examples = store.examples(ids)
    removed_keys = {p["key"] for p in chosen if p.get("outcome") != "relabel"}
    new_labels = {p["key"]: p["new_label"] for p in chosen if p.get("outcome") == "relabel"}
    train = list(task.train)
    task_keys = task.keys("train")
    if [examples[e]["key"] for e in ids] != task_keys or any(
            stored[k][1] != examples[e]["content_hash"] for k, e in zip(task_keys, ids)):
        raise InfluenceStoreError(f"the task's training data differ from what run {run_id} scored; verify with the "
                                  f"same data")
    kept = [task.relabelled(x, new_labels[k]) if k in new_labels else x
            for x, k in zip(train, task_keys) if k not in removed_keys]
    with phases.step(f"retraining on {len(train)} and on {len(kept)} training examples"):
        before, after = task.fit(train), task.fit(kept)
    loss_before, acc_before = evaluate(task, before)
    loss_after, acc_after = evaluate(task, after)
    agg = {r["example_id"]: r for r in store.aggregate_scores(run["id"])}
    # predicted: removals only (a relabel's effect needs the new example's gradient, which is not stored)
    predicted = sum(agg[p["example_id"]]["predicted_loss_change"] for p in chosen if p["key"] in removed_keys)
    values = dict(run_id=run["id"], proposal_ids_json=[p["id"] for p in chosen],
                  n_removed=len(chosen) - len(new_labels), n_relabelled=len(new_labels),
                  predicted_loss_change=predicted, actual_loss_change=loss_after - loss_before,
                  loss_before=loss_before, loss_after=loss_after, accuracy_before=acc_before,
                  accuracy_after=acc_after, seconds=time.perf_counter() - started, actor=actor or current_user())
    vid = store.add_verification(**values)
    return {"id": vid, **{k: v for k, v in values.items() if k != "proposal_ids_json"},
            "proposal_ids": [p["id"] for p in chosen]}


def evaluate(task, model) -> tuple[float, float | None]:
    """Mean test loss (and accuracy when the task defines it) of a model."""
    import torch

    from .train_mode import model_in_mode

    losses, correct = [], []
    with torch.no_grad(), model_in_mode(model, training=False):
        for start in range(0, len(task.test), 512):
            batch = task.batch("test", range(start, min(start + 512, len(task.test))))
            losses.append(task.loss(model, batch).double().reshape(-1))
            if task.accuracy is not None:
                correct.append(torch.as_tensor(task.accuracy(model, batch)).double().reshape(-1))
    loss = float(torch.cat(losses).mean())
    return loss, (float(torch.cat(correct).mean()) if correct else None)
