"""Built-in proposal rules: ``harmful`` (hurts the test set), ``self-influence`` (likely mislabels),
and ``loss`` (highest training loss: the baseline every influence rule should beat)."""

from __future__ import annotations

from dataclasses import dataclass

from influence_store.curation import ProposalRule
from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.options import option


class Harmful(ProposalRule):
    """Training examples whose scores summed over the test set are most negative (they raise the test loss)."""

    name = "harmful"

    @dataclass
    class Options:
        by: str = option("sum", "Rank by 'sum' (= 'mean' order) of scores over test examples, or 'hurts' "
                                "(how many test examples it hurts).")
        min_hurts: int = option(1, "Only propose examples that hurt at least this many test examples.")

    def candidates(self, store, run):
        if self.options.by not in ("sum", "mean", "hurts"):
            raise InfluenceStoreError("rule harmful: {by_option} must be sum, mean or hurts, got {by!r}",
                                      by=self.options.by, by_option='options["by"]')
        info = store.run_examples(run["id"], "train")
        rows = [r for r in store.aggregate_scores(run["id"]) if r["sum"] < 0 and r["hurts"] >= self.options.min_hurts]
        if self.options.by == "hurts":
            rows.sort(key=lambda r: (-r["hurts"], r["sum"]))
        else:
            rows.sort(key=lambda r: r[self.options.by])
        return [(r["example_id"], {
            "sum": r["sum"], "mean": r["mean"], "most_negative": r["min"], "hurts": r["hurts"],
            "n_test": run["n_test"], "predicted_loss_change": r["predicted_loss_change"],
            "train_loss": info[r["example_id"]]["loss"], "self_influence": info[r["example_id"]]["self_influence"],
        }) for r in rows]


class SelfInfluence(ProposalRule):
    """Training examples with the largest self-influence g^T H^-1 g: outliers and likely mislabels."""

    name = "self-influence"

    def candidates(self, store, run):
        rows = store.self_influence(run["id"])
        if not rows:
            raise InfluenceStoreError("run {run_id} has no self-influence; run again {with_self_influence}",
                                      run_id=run["id"], with_self_influence="with self_influence=True")
        by_loss = {r["example_id"]: i for i, r in enumerate(sorted(rows, key=lambda r: -r["loss"]), start=1)}
        return [(r["example_id"], {"self_influence": r["self_influence"], "train_loss": r["loss"],
                                   "self_influence_rank": i, "train_loss_rank": by_loss[r["example_id"]]})
                for i, r in enumerate(rows, start=1)]


class HighLoss(ProposalRule):
    """Training examples with the highest training loss (the baseline influence rules should beat)."""

    name = "loss"

    def candidates(self, store, run):
        info = store.run_examples(run["id"], "train")
        order = sorted(info, key=lambda e: -info[e]["loss"])
        return [(e, {"train_loss": info[e]["loss"], "self_influence": info[e]["self_influence"],
                     "train_loss_rank": i}) for i, e in enumerate(order, start=1)]


@hookimpl
def register_proposal_rules(register):
    register(Harmful)
    register(SelfInfluence)
    register(HighLoss)
