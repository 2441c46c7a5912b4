"""influence-store vs AllenNLP's SimpleInfluence, whole processes: the CLI against SimpleInfluence's script.

For each encoder (bag of embeddings, CNN, LSTM) a BasicClassifier is trained by AllenNLP's trainer on
offline sentiment-like JSONL (the generator of tests/test_allennlp.py; training is not timed). Then two
fresh Python processes are timed from start to exit, imports included, in interleaved rounds (the
minimum of each side is kept):

- SimpleInfluence's script: ``InfluenceInterpreter.from_path(archive, train_data_path=...)`` (SimpleInfluence) with its
  defaults (LiSSA batch 8, damping 3e-3, scale 1e4, recursion depth 0.25 of an epoch) and
  ``interpret_from_file(test, k=n_train)``;
- ``influence-store run allennlp:ARCHIVE --train-data ... --test-data ... --no-self-influence --quiet``
  (``-a lissa`` with no options: the same settings and the same number of steps), every score stored.

Both draw their LiSSA batches from different random generators, so the scores are compared by rank
(median Spearman over test instances). Needs the AllenNLP install:

    .venv/bin/pip install --no-deps -r requirements-allennlp.txt
    .venv/bin/python benchmarks/bench_allennlp.py [--train 1000] [--test 200] [--encoders bag cnn lstm] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIMPLE_INFLUENCE = """
import json, sys, warnings
warnings.simplefilter("ignore")
from allennlp.interpret.influence_interpreters import InfluenceInterpreter
archive, train, test, out = sys.argv[1:5]
interpreter = InfluenceInterpreter.from_path(archive, train_data_path=train)  # SimpleInfluence, its defaults
outputs = interpreter.interpret_from_file(test, k=len(interpreter.train_instances))
position = {id(x.instance): i for i, x in enumerate(interpreter.train_instances)}
rows = []
for output in outputs:
    row = [0.0] * len(position)
    for x in output.top_k:
        row[position[id(x.instance)]] = x.score
    rows.append(row)
json.dump(rows, open(out, "w"))
"""


def timed_process(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="training instances")
    parser.add_argument("--test", type=int, default=200, help="test instances (all are scored)")
    parser.add_argument("--encoders", nargs="+", default=["bag", "cnn", "lstm"], choices=["bag", "cnn", "lstm"])
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per side (minimum kept)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    import logging

    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from test_allennlp import train_archive, write_data

    root = Path(tempfile.mkdtemp(prefix="bench_allennlp_"))
    train = write_data(root / "train.jsonl", args.train, seed=0)
    test = write_data(root / "test.jsonl", args.test, seed=1, noise=0.0)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cli = str(Path(sys.executable).with_name("influence-store"))
    print(f"{args.train} train x {args.test} test instances; SimpleInfluence's default LiSSA on both sides; "
          f"whole processes, imports included; minimum of {args.rounds} interleaved round(s)")
    for encoder in args.encoders:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive = train_archive(root / encoder, train, embedding_dim=args.embedding_dim, epochs=5,
                                    encoder=encoder, reader="text_classification_json")
        theirs, mine = [], []
        for round_ in range(args.rounds):
            theirs.append(timed_process([sys.executable, "-c", SIMPLE_INFLUENCE, archive, train, test,
                                         str(root / f"{encoder}-theirs.json")], env))
            db = root / f"{encoder}-{round_}.db"
            mine.append(timed_process([cli, "run", f"allennlp:{archive}", "--db", str(db), "--train-data", train,
                                       "--test-data", test, "--no-self-influence", "--quiet", "--json"], env))
        diagnostics = run_diagnostics(db)
        print(f"{encoder:5s} SimpleInfluence {min(theirs):7.1f} s   influence-store {min(mine):6.1f} s "
              f"(load {diagnostics.get('seconds_load', float('nan')):.1f} s, compute "
              f"{diagnostics.get('seconds_compute', float('nan')):.1f} s, gradients: "
              f"{diagnostics.get('grad_path', {}).get('path')})   ratio {min(theirs) / min(mine):5.1f}x   "
              f"rank agreement {rank_agreement(db, root / f'{encoder}-theirs.json'):.3f}")


def run_diagnostics(db: Path) -> dict:
    from influence_store.store import Store

    store = Store(str(db))
    return store.run(max(r["id"] for r in store.runs()))["diagnostics"] or {}


def rank_agreement(db: Path, theirs_path: Path) -> float:
    """Median Spearman correlation of the two score rows of each test instance."""
    import torch
    from scipy.stats import spearmanr

    from influence_store.store import Store

    store = Store(str(db))
    run_id = max(r["id"] for r in store.runs())
    theirs = torch.tensor(json.load(open(theirs_path)), dtype=torch.float64)
    mine = torch.tensor(store_matrix(store, run_id, *theirs.shape), dtype=torch.float64)
    return float(torch.tensor([spearmanr(a, b).statistic for a, b in zip(mine, theirs)]).median())


def store_matrix(store, run_id: int, n_test: int, n_train: int) -> list[list[float]]:
    train_position = {e: i for i, e in enumerate(store.example_ids(run_id, "train"))}
    rows = [[0.0] * n_train for _ in range(n_test)]
    for t, test_id in enumerate(store.example_ids(run_id, "test")):
        for train_id, score in store.score_rows(run_id, test_id):
            rows[t][train_position[train_id]] = score
    return rows


if __name__ == "__main__":
    main()
