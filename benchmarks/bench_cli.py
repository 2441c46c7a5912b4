"""Whole-process time of `influence-store runs` against `influence-store --help` (target: at most 2x).

Each round starts every command once, in turn, as a new process (interleaved, so machine noise hits
all of them alike); it prints the median and minimum over the rounds and the ratios to `--help`.
For reference it also times the listing through the SQLAlchemy store (`Store(db).runs()` in a fresh
process), which is what every read paid before `runs` read the store with plain sqlite3.

    python benchmarks/bench_cli.py                 # builds a small store in a temporary folder
    python benchmarks/bench_cli.py --db influence-store.db --rounds 7   # e.g. the demo's store
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TASK = '''
import torch
import influence_store as ist


def task():
    torch.manual_seed(0)
    x, w = torch.randn(60, 5, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    y = (x @ w > 0).double()
    model = torch.nn.Linear(5, 1, dtype=torch.float64)

    def loss(model, batch):
        xb, yb = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb, reduction="none").reshape(-1)

    data = torch.utils.data.TensorDataset(x, y)
    return ist.Task(model, loss, torch.utils.data.Subset(data, range(50)),
                    torch.utils.data.Subset(data, range(50, 60)), l2=0.01)
'''


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="an existing store (default: a small one built here)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cli = str(Path(sys.executable).parent / "influence-store")
    with tempfile.TemporaryDirectory() as folder:
        db = args.db
        if db is None:
            (Path(folder) / "bench_task.py").write_text(textwrap.dedent(TASK))
            db = str(Path(folder) / "bench.db")
            subprocess.run([cli, "--db", db, "run", f"{folder}/bench_task.py:task", "-a", "exact", "--json"],
                           check=True, stdout=subprocess.DEVNULL)
        commands = {
            "--help": [cli, "--help"],
            "runs": [cli, "--db", db, "runs"],
            "runs --json": [cli, "--db", db, "runs", "--json"],
            "Store(db).runs() (SQLAlchemy)": [sys.executable, "-c",
                                              f"from influence_store.store import Store; "
                                              f"Store({db!r}, upgrade=False).runs()"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(timed(command))
    base = statistics.median(times["--help"])
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'median / --help':>16}")
    for name, values in times.items():
        print(f"{name:32} {statistics.median(values):9.3f} {min(values):7.3f} {statistics.median(values) / base:16.2f}")


if __name__ == "__main__":
    main()
