"""kronfluence 1.0.1 as the peer: its EK-FAC pairwise and self scores for a cross-entropy classifier.

Shared by tests/test_ekfac.py and benchmarks/bench_ekfac.py. Its covariances are means over examples
(rows), like ours, so its ``damping_factor`` equals our ridge (``damping`` + the task's ``l2``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from unittest import mock

import torch
import torch.nn.functional as F


def kronfluence_scores(model, train, test, *, ridge: float, fisher: str = "empirical", strategy: str = "ekfac",
                       batch_size: int = 64, self_influence: bool = False, output_dir: str | None = None,
                       release_memory: bool = True):
    """(pairwise scores [n_test, n_train], self scores [n_train] or None) from kronfluence.

    ``release_memory=False`` skips its housekeeping between stages (``gc.collect()`` and
    ``torch.compiler.reset()``, most of its time on tiny test problems); the numbers do not change.
    """
    with contextlib.ExitStack() as stack:
        if not release_memory:
            for module in ("utils.state", "factor.eigen", "computer.computer", "score.self", "score.dot_product"):
                stack.enter_context(mock.patch(f"kronfluence.{module}.release_memory", lambda: None))
        return _scores(model, train, test, ridge, fisher, strategy, batch_size, self_influence, output_dir)


def _scores(model, train, test, ridge, fisher, strategy, batch_size, self_influence, output_dir):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    task = Classification()
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("peer", wrapped, task, cpu=True, disable_tqdm=True, output_dir=output_dir or tmp)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
        analyzer.fit_all_factors("factors", train, per_device_batch_size=batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=ridge)
        analyzer.compute_pairwise_scores("pairwise", "factors", test, train, per_device_query_batch_size=len(test),
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        pairwise = analyzer.load_pairwise_scores("pairwise")["all_modules"].to(torch.float64)
        own = None
        if self_influence:
            analyzer.compute_self_scores("self", "factors", train, per_device_train_batch_size=batch_size,
                                         score_args=score_args, overwrite_output_dir=True)
            own = analyzer.load_self_scores("self")["all_modules"].to(torch.float64)
    return pairwise, own
