"""influence-store vs AllenNLP's SimpleInfluence: wall time on the same archive, data and LiSSA settings.

A BasicClassifier (bag of embeddings) is trained by AllenNLP's trainer on offline sentiment-like
JSONL (the generator of tests/test_allennlp.py). Both sides start from the archive path and score
every test instance against every training instance with SimpleInfluence's default LiSSA settings
(batch 8, damping 3e-3, scale 1e4, depth 0.25 of an epoch, counted AllenNLP's way); imports and
training are excluded. Also prints how the two rank training examples (their batches are drawn by
different random generators, so only rank agreement is expected) and how each ranks against
``exact`` at the same effective ridge (damping * scale = 30). Needs the AllenNLP install:

    .venv/bin/pip install --no-deps -r requirements-allennlp.txt
    .venv/bin/python benchmarks/bench_allennlp.py [--train 1000] [--test 100] [--embedding-dim 16]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: tiny ops under load

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import influence_store as ist  # noqa: E402
from influence_store.plugin_manager import get_plugin_manager  # noqa: E402
from influence_store.plugins.allennlp_tasks import _import_allennlp_plugins  # noqa: E402
from influence_store.task import load_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_allennlp import train_archive, write_data  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from allennlp.interpret.influence_interpreters import InfluenceInterpreter  # noqa: E402

DEFAULTS = {"lissa_batch_size": 8, "damping": 3e-3, "scale": 1e4, "recursion_depth": 0.25}


@contextlib.contextmanager
def silenced():
    """Training and SimpleInfluence print progress bars and logs; keep the report readable."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def simple_influence(archive: str, train: str, test: str, n_train: int) -> torch.Tensor:
    """SimpleInfluence.from_path + interpret_from_file, all scores kept (k = n_train); plugins are
    already imported (both sides' discovery is excluded as an import)."""
    interpreter = InfluenceInterpreter.from_path(archive, train_data_path=train, import_plugins=False, **DEFAULTS)
    outputs = interpreter.interpret_from_file(test, k=n_train)
    position = {id(x.instance): i for i, x in enumerate(interpreter.train_instances)}
    scores = torch.zeros(len(outputs), n_train, dtype=torch.float64)
    for t, output in enumerate(outputs):
        for x in output.top_k:
            scores[t, position[id(x.instance)]] = x.score
    return scores


def ours(archive: str, train: str, test: str, depth: int) -> torch.Tensor:
    task = load_task(f"allennlp:{archive}", {"train_data": train, "test_data": test})
    options = {"batch_size": DEFAULTS["lissa_batch_size"], "damping": DEFAULTS["damping"],
               "scale": DEFAULTS["scale"], "depth_iters": depth}
    return ist.compute_scores(task, "lissa", options).matrix()


def median_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.tensor([spearmanr(x, y).statistic for x, y in zip(a, b)]).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="training instances")
    parser.add_argument("--test", type=int, default=100, help="test instances (all are scored)")
    parser.add_argument("--embedding-dim", type=int, default=16)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # AllenNLP logs every config value, and that it has no _jsonnet
    root = Path(tempfile.mkdtemp(prefix="bench_allennlp_"))
    train = write_data(root / "train.jsonl", args.train, seed=0)
    test = write_data(root / "test.jsonl", args.test, seed=1, noise=0.0)
    with silenced():
        archive = train_archive(root / "serialization", train, embedding_dim=args.embedding_dim, epochs=10)
    # AllenNLP's float depth: int(batches per epoch * fraction) steps per test instance.
    depth = int(math.ceil(args.train / DEFAULTS["lissa_batch_size"]) * DEFAULTS["recursion_depth"])
    # Imports excluded: AllenNLP's plugin discovery imports every allennlp module, and our plugin
    # manager imports every built-in plugin (the store's SQLAlchemy among them).
    _import_allennlp_plugins()
    get_plugin_manager()
    with silenced():  # SimpleInfluence's progress bars
        theirs, their_seconds = timed(lambda: simple_influence(archive, train, test, args.train))
    mine, my_seconds = timed(lambda: ours(archive, train, test, depth))
    task = load_task(f"allennlp:{archive}", {"train_data": train, "test_data": test})
    exact = ist.compute_scores(task, "exact", {"damping": DEFAULTS["damping"] * DEFAULTS["scale"]}).matrix()
    params = sum(p.numel() for p in task.model.parameters())
    print(f"model: BasicClassifier, {params} parameters; {args.train} train x {args.test} test instances; "
          f"LiSSA batch 8, damping 3e-3, scale 1e4, {depth} steps; torch threads {torch.get_num_threads()}")
    print(f"SimpleInfluence: {their_seconds:8.2f} s")
    print(f"influence-store: {my_seconds:8.2f} s")
    print(f"ratio:           {their_seconds / my_seconds:8.1f}x faster")
    print(f"rank agreement (median Spearman over test instances): influence-store vs SimpleInfluence "
          f"{median_spearman(mine, theirs):.3f}; vs exact at ridge 30: influence-store "
          f"{median_spearman(mine, exact):.3f}, SimpleInfluence {median_spearman(theirs, exact):.3f}")


if __name__ == "__main__":
    main()
