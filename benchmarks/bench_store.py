"""Store benchmark: how fast scores are persisted, and what share of a real run that takes.

    .venv/bin/python benchmarks/bench_store.py            # about 1 minute on 2 CPU cores
    .venv/bin/python benchmarks/bench_store.py --quick    # smaller sizes, a smoke test

1. Throughput of ``Store.write_chunk`` on SQLite (WAL, synchronous=NORMAL, the store's defaults): a run
   of N_TEST x N_TRAIN random float64 scores written in chunks, each chunk one transaction with its
   progress marker. Baselines in the same process, same data, same chunking, fresh store each:
   SQLAlchemy Core ``execute(insert, [dict, ...])`` (executemany of dicts), and one-row executemany of
   tuples with foreign keys on (how ``write_chunk`` worked before). Every timing is the best of a few
   repeats; scores/s is given per wall second and per CPU second of this process (on a shared machine
   the CPU figure is the one that does not depend on what else runs). Goal: >= 1,000,000 scores/s.
2. Share of a whole run: the bundled noisy-digits example (1,200 train x 597 test = 716,400 scores)
   run through ``execute_run`` into a fresh store, with the exact inverse Hessian and with LiSSA's
   defaults; the store's own ``seconds_writing`` against the run's seconds (loading the task, i.e.
   training the model, is not part of a run and is shown apart). Goal: <= 10% of the run's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

from influence_store.schema import RunChunk, Score, utcnow  # noqa: E402
from influence_store.store import Store  # noqa: E402


def make_run(store: Store, n_train: int, n_test: int) -> tuple[int, list[int], list[int]]:
    settings = {"approximator": "exact", "options": {}, "freeze": "all", "freeze_options": {},
                "tracked_fingerprint": "t", "num_params": 1, "seed": 0, "effective_damping": 0.0,
                "sign_convention": "bench", "versions": {}, "device": "cpu"}
    run_id = store.create_run(
        version_name="bench", weights_sha256="w", train_dataset="train", test_dataset="test",
        train_rows=[(f"train-{i}", f"h{i}", None, {}) for i in range(n_train)],
        test_rows=[(f"test-{i}", f"g{i}", None, {}) for i in range(n_test)], train_losses=[0.0] * n_train,
        test_losses=[0.0] * n_test, task_spec="bench", task_options={}, settings=settings,
        settings_fingerprint="bench", chunks_total=1)
    return run_id, store.example_ids(run_id, "train"), store.example_ids(run_id, "test")


def write_chunk_store(store, run_id, index, test_ids, train_ids, scores):
    store.write_chunk(run_id, index, test_ids, train_ids, scores)


def write_chunk_core_dicts(store, run_id, index, test_ids, train_ids, scores):
    """Baseline: SQLAlchemy Core executemany of one dict per score."""
    with store.engine.begin() as connection:
        connection.execute(Score.__table__.insert(), [
            {"run_id": run_id, "test_example_id": t, "train_example_id": j, "score": v}
            for t, row in zip(test_ids, scores.tolist()) for j, v in zip(train_ids, row)])
        connection.execute(RunChunk.__table__.insert(), {"run_id": run_id, "chunk_index": index,
                                                          "finished_utc": utcnow()})


def write_chunk_row_tuples(store, run_id, index, test_ids, train_ids, scores):
    """Baseline: sqlite3 executemany of one (run, test, train, score) tuple per row, foreign keys on."""
    with store.engine.begin() as connection:
        connection.connection.driver_connection.executemany(
            "INSERT INTO scores (run_id, test_example_id, train_example_id, score) VALUES (?, ?, ?, ?)",
            [(run_id, t, j, v) for t, row in zip(test_ids, scores.tolist()) for j, v in zip(train_ids, row)])
        connection.execute(RunChunk.__table__.insert(), {"run_id": run_id, "chunk_index": index,
                                                          "finished_utc": utcnow()})


def time_writer(writer, folder: Path, n_train: int, n_test: int, chunk: int, repeats: int) -> dict:
    """Best wall and CPU seconds to write every chunk of one run into a fresh store; checks the row count."""
    scores = np.random.default_rng(0).standard_normal((n_test, n_train))
    best_wall = best_cpu = float("inf")
    for repeat in range(repeats):
        store = Store(str(folder / f"{writer.__name__}-{repeat}.db"))
        run_id, train_ids, test_ids = make_run(store, n_train, n_test)
        wall, cpu = time.perf_counter(), time.process_time()
        for index, start in enumerate(range(0, n_test, chunk)):
            writer(store, run_id, index, test_ids[start:start + chunk], train_ids, scores[start:start + chunk])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with store.engine.connect() as connection:
            stored = connection.exec_driver_sql(f"SELECT count(*) FROM scores WHERE run_id = {run_id}").scalar()
        assert stored == n_test * n_train, (writer.__name__, stored)
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
        store.engine.dispose()
    n = n_test * n_train
    return {"writer": writer.__name__, "scores": n, "wall_s": best_wall, "cpu_s": best_cpu,
            "per_wall_s": n / best_wall, "per_cpu_s": n / best_cpu}


def throughput(folder: Path, quick: bool) -> list[dict]:
    n_train, n_test, chunk = (1000, 200, 100) if quick else (2000, 500, 250)
    repeats = 1 if quick else 3
    rows = [time_writer(write_chunk_store, folder, n_train, n_test, chunk, repeats)]
    for baseline in (write_chunk_row_tuples, write_chunk_core_dicts):
        rows.append(time_writer(baseline, folder, n_train, n_test, chunk, 1 if quick else 2))
    return rows


def run_share(folder: Path, task, approximator: str, options: dict) -> dict:
    """One run of a loaded task through execute_run into a fresh store; the store's share of its seconds."""
    from influence_store.runs import execute_run

    from influence_store.scoring import compute_scores

    # Baseline in the same process: the same computation with nothing stored.
    started = time.perf_counter()
    computation = compute_scores(task, approximator, options)
    for _ in computation.chunks():
        pass
    computation.self_influence()
    compute_s = time.perf_counter() - started

    store = Store(str(folder / f"run-{approximator}.db"))
    started = time.perf_counter()
    result = execute_run(store, task, approximator=approximator, options=options)
    wall_s = time.perf_counter() - started
    run = store.run(result.run_id)
    n = run["n_train"] * run["n_test"]
    overhead = max(0.0, wall_s - compute_s)
    return {"approximator": approximator, "scores": n, "run_s": wall_s, "compute_s": compute_s,
            "writing_s": run["seconds_writing"], "overhead_s": overhead, "share": overhead / wall_s,
            "in_run_per_s": n / run["seconds_writing"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"numbers are best of repeats")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("\n1. score persistence throughput (SQLite)")
        rows = throughput(folder, args.quick)
        print(f"   {'writer':<26} {'scores':>9} {'wall s':>8} {'scores/s (wall)':>16} {'scores/s (CPU)':>15}")
        for r in rows:
            print(f"   {r['writer']:<26} {r['scores']:>9,} {r['wall_s']:>8.2f} {r['per_wall_s']:>16,.0f} "
                  f"{r['per_cpu_s']:>15,.0f}")
        ours = rows[0]
        for r in rows[1:]:
            print(f"   write_chunk vs {r['writer']}: {ours['per_wall_s'] / r['per_wall_s']:.1f}x (wall), "
                  f"{ours['per_cpu_s'] / r['per_cpu_s']:.1f}x (CPU)")
        print(f"   goal >= 1,000,000 scores/s: {'met' if ours['per_wall_s'] >= 1e6 else 'NOT met'} (wall), "
              f"{'met' if ours['per_cpu_s'] >= 1e6 else 'NOT met'} (CPU)")

        print("\n2. share of a whole run (examples/digits_noisy.py, 1,200 x 597 scores)")
        from influence_store.task import load_task

        loading = time.perf_counter()
        task = load_task(str(ROOT / "examples" / "digits_noisy.py") + ":task")
        print(f"   loading the task (training the model, not part of a run): {time.perf_counter() - loading:.1f} s")
        for approximator, options in (("exact", {"damping": 0.001}), ("lissa", {})):
            r = run_share(folder, task, approximator, options)
            print(f"   {approximator:<6} run {r['run_s']:.1f} s vs {r['compute_s']:.1f} s computing without a store: "
                  f"the store adds {r['overhead_s']:.2f} s = {100 * r['share']:.1f}% of the run's wall time "
                  f"(its writer thread was busy {r['writing_s']:.2f} s, {r['in_run_per_s']:,.0f} scores/s, mostly "
                  f"overlapped with computation); goal <= 10%: {'met' if r['share'] <= 0.10 else 'NOT met'}")
        print("\n3. share of a whole run, a larger model (tests/tasks.py digits MLP, 2,410 parameters, 1,200 x 597)")
        sys.path.insert(0, str(ROOT / "tests"))
        from tasks import digits_mlp_task

        task = digits_mlp_task(n_train=1200, n_test=597)
        (folder / "mlp").mkdir()
        r = run_share(folder / "mlp", task, "lissa", {})
        print(f"   lissa  run {r['run_s']:.1f} s vs {r['compute_s']:.1f} s computing without a store: "
              f"the store adds {r['overhead_s']:.2f} s = {100 * r['share']:.1f}% of the run's wall time "
              f"(writer busy {r['writing_s']:.2f} s); goal <= 10%: {'met' if r['share'] <= 0.10 else 'NOT met'}")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
