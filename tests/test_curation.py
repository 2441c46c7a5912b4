"""The curation loop through the Python API, on the bundled noisy digits (sklearn digits, 10% of the 1200
training labels flipped with a fixed seed, L2 softmax regression, exact inverse Hessian).

The references are independent of the influence code: the flipped labels themselves (recorded in
each stored payload as ``original_label``), the raw scores table read with sqlite3, and the test
loss of models retrained from scratch with the task's own ``fit``. The digits run is conftest's
session-wide ``digits_template`` (exact, computed once); each test works on its own copy of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import influence_store as ist
from influence_store.curation import ProposalRule, propose, review, verify
from influence_store.store import Store
import stored

SPEC = "influence_store.examples.digits_noisy:task"


@pytest.fixture(scope="module")
def task():
    """The digits task itself (the model the shared ``digits_template`` run scored, and its fit)."""
    return ist.load_task(SPEC)


@pytest.fixture
def digits(digits_store, task):
    """A private copy of the session's digits store (conftest), with the task: .store, .run_id, .task."""
    store, run_id = digits_store
    return SimpleNamespace(store=store, run_id=run_id, task=task)


@pytest.fixture(scope="module")
def scores_table(digits_template):
    path, run_id = digits_template
    return score_matrix(Store(str(path)), run_id)


def sql(store: Store, query: str, *params) -> list[tuple]:
    return stored.sql(store.path, query, *params)


def score_matrix(store: Store, run_id: int) -> tuple[np.ndarray, list[str]]:
    """(test x train) scores straight from the table, and the training keys in column order."""
    rows = sql(store, "SELECT t.position, r.position, s.score FROM scores s "
                      "JOIN run_examples t ON t.run_id = s.run_id AND t.split = 'test' "
                      "AND t.example_id = s.test_example_id "
                      "JOIN run_examples r ON r.run_id = s.run_id AND r.split = 'train' "
                      "AND r.example_id = s.train_example_id WHERE s.run_id = ?", run_id)
    positions = np.array([(t, r) for t, r, _ in rows])
    matrix = np.full(positions.max(0) + 1, np.nan)
    matrix[positions[:, 0], positions[:, 1]] = [v for _, _, v in rows]
    keys = [k for (k,) in sql(store, "SELECT e.key FROM run_examples r JOIN examples e ON e.id = r.example_id "
                                     "WHERE r.run_id = ? AND r.split = 'train' ORDER BY r.position", run_id)]
    return matrix, keys


def mean_test_loss(task, model) -> float:
    """Mean cross-entropy of a model on the task's test set, computed here (not with the library's evaluate)."""
    x, y = task.collate(list(task.test))
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def is_flipped(example: dict) -> bool:
    return example["label"] != example["original_label"]


def test_self_influence_ranking_finds_flipped_labels(digits):
    proposals = propose(digits.store, digits.run_id, "self-influence", top=len(digits.task.train))
    assert len(proposals) == 1200
    payloads = digits.store.examples(p["example_id"] for p in proposals)
    flipped = np.array([is_flipped(payloads[p["example_id"]]["payload"]) for p in proposals])
    self_influence = np.array([p["evidence"]["self_influence"] for p in proposals])
    assert flipped.sum() == 120  # 10% of the training labels, as the example says
    assert np.all(np.diff(self_influence) <= 0)  # proposals come largest first
    assert roc_auc_score(flipped, self_influence) >= 0.98  # measured: 0.996
    assert flipped[:100].mean() >= 0.9

    # The training loss shown next to it is the model's own per-example loss (the baseline to beat).
    train = list(digits.task.train)
    x, y = digits.task.collate(train)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(digits.task.model(x), y, reduction="none").numpy()
    by_key = dict(zip(digits.task.keys("train"), losses))
    assert [p["evidence"]["train_loss"] for p in proposals[:50]] == pytest.approx(
        [by_key[p["key"]] for p in proposals[:50]], rel=1e-9)
    loss_rank = {k: i for i, k in enumerate(sorted(by_key, key=lambda k: -by_key[k]), start=1)}
    assert [p["evidence"]["train_loss_rank"] for p in proposals[:50]] == [loss_rank[p["key"]] for p in proposals[:50]]


def test_removing_top_harmful_lowers_test_loss_more_than_random_removals(digits):
    task = digits.task
    harmful = propose(digits.store, digits.run_id, "harmful", top=10)
    review(digits.store, "accept", [p["id"] for p in harmful], note="hurts the test set", actor="tester")
    checked = verify(digits.store, digits.run_id, task=task, actor="tester")

    base = mean_test_loss(task, task.model)  # the task's model is fit(train): same objective, same seed
    assert checked["loss_before"] == pytest.approx(base, rel=1e-6)
    assert checked["n_removed"] == 10 and checked["proposal_ids"] == [p["id"] for p in harmful]
    harmful_change = checked["actual_loss_change"]
    assert harmful_change < 0  # measured: -0.0274 (all ten are flipped labels)
    predicted = sum(p["evidence"]["predicted_loss_change"] for p in harmful)
    assert checked["predicted_loss_change"] == pytest.approx(predicted, rel=1e-12)
    assert 0.8 < predicted / harmful_change < 1.25  # measured: -0.0265 / -0.0274 = 0.97
    assert checked["accuracy_after"] >= checked["accuracy_before"]

    # Baseline: remove 10 random training examples (fixed seeds) and retrain with the same fit.
    train, rng = list(task.train), np.random.default_rng(0)
    random_changes = []
    for _ in range(3):
        drop = set(rng.choice(len(train), size=10, replace=False).tolist())
        random_changes.append(mean_test_loss(task, task.fit([e for i, e in enumerate(train) if i not in drop])) - base)
    assert harmful_change < np.mean(random_changes) - 0.01  # measured: random draws move it by -0.002 .. +0.002

    (row,) = sql(digits.store, "SELECT run_id, n_removed, predicted_loss_change, actual_loss_change, actor "
                               "FROM verifications")
    assert row[:2] == (digits.run_id, 10) and row[4] == "tester"
    assert row[2:4] == pytest.approx((predicted, harmful_change))


@pytest.mark.parametrize("mode", ["sum", "hurts", "min_hurts"])
def test_harmful_rule_matches_the_scores_table(digits, scores_table, mode):
    scores, keys = scores_table
    assert not np.isnan(scores).any() and scores.shape == (len(digits.task.test), 1200)
    total, hurts = scores.sum(0), (scores < 0).sum(0)
    negative = total < 0
    # min_hurts: a threshold that keeps a dozen of the harmful examples, so it changes the top 8.
    threshold = int(np.sort(hurts[negative])[-12]) if mode == "min_hurts" else 1
    options = {"by": "hurts"} if mode == "hurts" else {"min_hurts": str(threshold)} if mode == "min_hurts" else {}
    eligible = [j for j in range(1200) if negative[j] and hurts[j] >= threshold]
    if mode == "hurts":
        eligible.sort(key=lambda j: (-hurts[j], total[j]))
    else:
        eligible.sort(key=lambda j: total[j])
    proposals = propose(digits.store, digits.run_id, "harmful", top=8, options=options)
    assert len(proposals) == 8 and len(eligible) >= 8
    assert [p["key"] for p in proposals] == [keys[j] for j in eligible[:8]]
    for p, j in zip(proposals, eligible):
        assert p["evidence"]["sum"] == pytest.approx(total[j], rel=1e-9)
        assert p["evidence"]["mean"] == pytest.approx(total[j] / scores.shape[0], rel=1e-9)
        assert p["evidence"]["hurts"] == hurts[j]
        assert p["evidence"]["most_negative"] == pytest.approx(scores[:, j].min())
        assert p["evidence"]["predicted_loss_change"] == pytest.approx(total[j] / scores.shape[0] / 1200, rel=1e-9)
    assert all(p["rule_options"] == {"by": options.get("by", "sum"), "min_hurts": threshold} for p in proposals)


def test_no_rule_proposes_test_examples_and_proposals_do_not_repeat(digits):
    seen: set[int] = set()
    for rule in ("harmful", "self-influence", "loss"):
        created = propose(digits.store, digits.run_id, rule, top=40)
        ids = {p["example_id"] for p in created}
        assert len(created) == 40 and ids.isdisjoint(seen)  # already proposed examples are skipped
        seen |= ids
    train = {e for (e,) in sql(digits.store, "SELECT example_id FROM run_examples WHERE run_id = ? AND split = 'train'",
                               digits.run_id)}
    proposed = {e for (e,) in sql(digits.store, "SELECT example_id FROM proposals")}
    assert proposed == seen and proposed <= train


def test_a_rule_that_proposes_a_test_example_is_refused(digits, throwaway_plugin):
    class TestSetRule(ProposalRule):
        """A broken rule: proposes test examples."""

        name = "test-set"

        def candidates(self, store, run):
            return [(e, {}) for e in store.example_ids(run["id"], "test")]

    class Rules:
        @ist.hookimpl
        def register_proposal_rules(self, register):
            register(TestSetRule)

    throwaway_plugin(Rules(), "test-set-rule")
    with pytest.raises(ist.InfluenceStoreError, match=f"not a training example of run {digits.run_id}"):
        propose(digits.store, digits.run_id, "test-set", top=3)
    assert sql(digits.store, "SELECT count(*) FROM proposals") == [(0,)]
    assert sql(digits.store, "SELECT count(*) FROM proposal_events") == [(0,)]
