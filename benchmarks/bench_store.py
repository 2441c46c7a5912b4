"""Store benchmark: what storing every score costs a real run, how fast and how small the store is.

    .venv/bin/python benchmarks/bench_store.py            # the 20,000 x 500 task: about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_store.py --quick    # 2,000 x 100, a smoke test

1. Throughput of ``Store.write_chunk`` on SQLite (WAL, synchronous=NORMAL, the store's defaults): 20,000
   train x 100 test random scores in chunks of 50 test examples (about what the run of part 2 uses), each
   chunk one transaction with its progress marker, float64 scores and float32-exact scores (a float32
   model's). Baseline in the same process, same data and chunking: the row-per-score layout this store used
   before (multi-row INSERTs into a ``scores`` table, the fastest way it was written). Best of repeats, per
   wall second and per CPU second. With ``INFLUENCE_STORE_TEST_POSTGRES`` set (a SQLAlchemy URL), the same
   for PostgreSQL (``COPY``).
2. Share of a whole run: the 20,000 x 500 task (a 29,322-parameter tanh MLP on ``make_classification``,
   ``-a lissa`` with its defaults, no self-influence) through ``execute_run`` into a fresh store, against the
   same computation with nothing stored (``compute_scores``, every chunk), in the same process, rounds
   interleaved, minimum of each. Goal: the store adds <= 10% of the run's wall time.
3. That store: bytes per score (the whole file, after a checkpoint; goal <= 16) and the two plain-SQL queries
   of docs/store.md, run with the ``sqlite3`` module (best of 5; goal < 0.1 s each).
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from influence_store.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "INFLUENCE_STORE_TEST_POSTGRES"


def make_run(store: Store, n_train: int, n_test: int, name: str = "bench") -> tuple[int, list[int], list[int]]:
    settings = {"approximator": "exact", "options": {}, "freeze": "all", "freeze_options": {},
                "tracked_fingerprint": "t", "num_params": 1, "seed": 0, "effective_damping": 0.0,
                "sign_convention": "bench", "versions": {}, "device": "cpu"}
    run_id = store.create_run(
        version_name=name, weights_sha256=name, train_dataset=f"{name}-train", test_dataset=f"{name}-test",
        train_rows=[(f"train-{i}", f"h{i}", None, {}) for i in range(n_train)],
        test_rows=[(f"test-{i}", f"g{i}", None, {}) for i in range(n_test)], train_losses=[0.0] * n_train,
        test_losses=[0.0] * n_test, task_spec="bench", task_options={}, settings=settings,
        settings_fingerprint=name, chunks_total=1)
    return run_id, store.example_ids(run_id, "train"), store.example_ids(run_id, "test")


def write_chunk_store(store, run_id, index, test_ids, train_ids, scores):
    store.write_chunk(run_id, index, test_ids, train_ids, scores)


ROWS_PER_INSERT = 249


def write_chunk_rows(store, run_id, index, test_ids, train_ids, scores):
    """Baseline: one row per score, as this store wrote them before (multi-row INSERTs, no FK lookups)."""
    raw_sql = "INSERT INTO legacy_scores VALUES " + ", ".join(["(?, ?, ?, ?)"] * ROWS_PER_INSERT)
    flat = [v for t, row in zip(test_ids, scores.tolist()) for j, s in zip(train_ids, row) for v in (run_id, t, j, s)]
    with store.engine.begin() as connection:
        raw = connection.connection.driver_connection
        width = 4 * ROWS_PER_INSERT
        full = len(flat) // width * width
        raw.executemany(raw_sql, zip(*[iter(flat[:full])] * width))
        rest = flat[full:]
        if rest:
            raw.execute("INSERT INTO legacy_scores VALUES " + ", ".join(["(?, ?, ?, ?)"] * (len(rest) // 4)), rest)


def fresh_store(location: str) -> Store:
    store = Store(location)
    if store.is_sqlite:
        with store.engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS legacy_scores (run_id INTEGER, test_example_id "
                                       "INTEGER, train_example_id INTEGER, score REAL, PRIMARY KEY (run_id, "
                                       "test_example_id, train_example_id)) WITHOUT ROWID")
    return store


def time_writer(writer, location, scores: np.ndarray, chunk: int, repeats: int, name: str) -> dict:
    """Best wall and CPU seconds to write every chunk of one run into a fresh run of the store."""
    n_test, n_train = scores.shape
    best_wall = best_cpu = float("inf")
    for repeat in range(repeats):
        store = fresh_store(location(f"{writer.__name__}-{name}-{repeat}"))
        run_id, train_ids, test_ids = make_run(store, n_train, n_test, f"{name}-{writer.__name__}-{repeat}")
        wall, cpu = time.perf_counter(), time.process_time()
        for index, start in enumerate(range(0, n_test, chunk)):
            writer(store, run_id, index, test_ids[start:start + chunk], train_ids, scores[start:start + chunk])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if writer is write_chunk_store:
            assert np.array_equal(store.score_matrix(run_id), scores)
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
        store.engine.dispose()
    n = scores.size
    return {"writer": f"{writer.__name__} ({name})", "scores": n, "wall_s": best_wall, "per_wall_s": n / best_wall,
            "per_cpu_s": n / best_cpu}


def throughput(folder: Path, quick: bool) -> list[dict]:
    n_train, n_test, chunk = (2000, 100, 25) if quick else (20000, 100, 50)
    repeats = 1 if quick else 3
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((n_test, n_train))
    narrow = wide.astype(np.float32).astype(np.float64)
    in_folder = lambda name: str(folder / f"{name}.db")  # noqa: E731
    rows = [time_writer(write_chunk_store, in_folder, wide, chunk, repeats, "float64"),
            time_writer(write_chunk_store, in_folder, narrow, chunk, repeats, "float32-exact"),
            time_writer(write_chunk_rows, in_folder, wide, chunk, 1, "row per score")]
    url = os.environ.get(POSTGRES_ENV)
    if url:
        store = Store(url)
        rows.append(time_writer(write_chunk_store, lambda name: url, wide, chunk, repeats, "PostgreSQL float64"))
        with store.engine.begin() as connection:  # leave the test server as it was
            connection.exec_driver_sql("DELETE FROM runs WHERE task_spec = 'bench'")
    return rows


def classification_task(n_train: int, n_test: int, seed: int = 0):
    """A tanh MLP (60 -> 160 -> 120 -> 2, 29,322 parameters) trained briefly on make_classification data."""
    import torch
    from sklearn.datasets import make_classification
    from torch.utils.data import TensorDataset

    import influence_store as ist

    x, y = make_classification(n_samples=n_train + n_test, n_features=60, n_informative=30, n_classes=2,
                               flip_y=0.05, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(60, 160), torch.nn.Tanh(), torch.nn.Linear(160, 120),
                                torch.nn.Tanh(), torch.nn.Linear(120, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        for batch in torch.randperm(n_train).split(256):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()

    def loss(m, batch):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(m(inputs), labels, reduction="none")

    return ist.Task(model=model.eval(), loss=loss, train=TensorDataset(x[:n_train], y[:n_train]),
                    test=TensorDataset(x[n_train:], y[n_train:]), name=f"classification-{n_train}")


def compute_only(task) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of the computation with nothing stored."""
    from influence_store.scoring import compute_scores

    started, cpu = time.perf_counter(), time.process_time()
    computation = compute_scores(task, "lissa", {})
    for _ in computation.chunks():
        pass
    return time.perf_counter() - started, time.process_time() - cpu


def stored_run(task, path: Path) -> tuple[float, float, dict]:
    from influence_store.runs import execute_run

    store = Store(str(path))
    started, cpu = time.perf_counter(), time.process_time()
    result = execute_run(store, task, approximator="lissa", self_influence=False)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    run = store.run(result.run_id)
    store.engine.dispose()
    return seconds, cpu, run


def bytes_per_score(path: Path, n_scores: int) -> float:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / n_scores


def query_seconds(path: Path, test_key: str) -> list[float]:
    queries = re.findall(r"```sql\n(.*?)```", (ROOT / "docs" / "store.md").read_text(), re.S)
    timings = []
    with sqlite3.connect(path) as connection:
        run_id = connection.execute("SELECT max(id) FROM runs").fetchone()[0]
        for query in queries:
            query = query.replace("run_id = 1", f"run_id = {run_id}").replace("'17'", f"'{test_key}'")
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                rows = connection.execute(query).fetchall()
                best = min(best, time.perf_counter() - started)
            assert len(rows) == 10, rows
            timings.append(best)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of part 2 (minimum of each)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("\n1. Store.write_chunk throughput")
        rows = throughput(folder, args.quick)
        print(f"   {'writer':<44} {'scores':>10} {'wall s':>7} {'scores/s (wall)':>16} {'scores/s (CPU)':>15}")
        for r in rows:
            print(f"   {r['writer']:<44} {r['scores']:>10,} {r['wall_s']:>7.2f} {r['per_wall_s']:>16,.0f} "
                  f"{r['per_cpu_s']:>15,.0f}")
        for r in rows[:2]:
            print(f"   {r['writer']} vs row per score: {r['per_wall_s'] / rows[2]['per_wall_s']:.1f}x (wall), "
                  f"{r['per_cpu_s'] / rows[2]['per_cpu_s']:.1f}x (CPU)")

        n_train, n_test = (2000, 100) if args.quick else (20000, 500)
        print(f"\n2. share of a whole run: {n_train:,} x {n_test:,} scores, tanh MLP, lissa defaults, "
              f"no self-influence")
        loading = time.perf_counter()
        task = classification_task(n_train, n_test)
        print(f"   building and training the task (not part of a run): {time.perf_counter() - loading:.1f} s")
        compute_s, compute_cpu, run_s, run_cpu, run = [], [], [], [], None
        for round_ in range(1 if args.quick else args.rounds):
            wall, cpu = compute_only(task)
            compute_s.append(wall)
            compute_cpu.append(cpu)
            path = folder / f"run-{round_}" / "store.db"
            path.parent.mkdir()
            wall, cpu, run = stored_run(task, path)
            run_s.append(wall)
            run_cpu.append(cpu)
            print(f"   round {round_ + 1}: computing alone {compute_s[-1]:.1f} s ({compute_cpu[-1]:.1f} CPU s), "
                  f"run with the store {wall:.1f} s ({cpu:.1f} CPU s); writer busy {run['seconds_writing']:.2f} s; "
                  f"load average {os.getloadavg()[0]:.1f}")
        n = run["n_train"] * run["n_test"]
        for label, stored_, alone in (("wall", run_s, compute_s), ("CPU", run_cpu, compute_cpu)):
            overhead = max(0.0, min(stored_) - min(alone))
            share = overhead / min(stored_)
            print(f"   {label}: the store adds {overhead:.2f} s = {100 * share:.1f}% of the run's {label} time "
                  f"(minima: run {min(stored_):.1f} s, computing {min(alone):.1f} s); goal <= 10%: "
                  f"{'met' if share <= 0.10 else 'NOT met'}")
        print(f"   {run['chunks_total']} chunks; the writer stored {n / run['seconds_writing']:,.0f} scores/s")

        print("\n3. the stored run's file and the plain-SQL queries of docs/store.md")
        size = bytes_per_score(path, n)
        print(f"   {size:.2f} bytes per score ({n:,} scores, whole file); goal <= 16: "
              f"{'met' if size <= 16 else 'NOT met'}")
        harmful_one, harmful_mean = query_seconds(path, str(n_test // 2))
        for label, seconds in (("10 most harmful for one test example", harmful_one),
                               ("10 most harmful on average", harmful_mean)):
            print(f"   {label}: {1000 * seconds:.2f} ms; goal < 100 ms: {'met' if seconds < 0.1 else 'NOT met'}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
