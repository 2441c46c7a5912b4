"""Scaling benchmark: PostgreSQL's write speed, and two processes against one on the same run.

    bash scripts/postgres_server.sh 54331      # a private server (Debian's postgresql), prints its URL
    .venv/bin/python benchmarks/bench_scale.py --postgres postgresql+psycopg://postgres@127.0.0.1:54331/postgres
    ... --quick                                # smaller sizes, one round: a smoke test

1. ``Store.write_chunk`` throughput into PostgreSQL and into SQLite, same random float64 scores, same
   chunks (each chunk one transaction with its done-marker), a fresh database per round, rounds
   interleaved, the best round of each. scores/s per wall second.
2. One run of benchmarks/scale_task.py (a digits MLP, LiSSA) into a fresh PostgreSQL database by
   (a) one ``influence-store run`` process, (b) two such processes started together by hand, which share
   the run block by block, (c) ``--workers 2`` (a Dask LocalCluster). Wall time from start until every
   process ended, including Python's start-up and the task's loading in each process. Every process
   runs torch on one thread (OMP_NUM_THREADS=1), so (a) uses one core and (b), (c) two. Rounds interleaved,
   minima. Each configuration's scores are checked equal (bit for bit) to the first one's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_store import make_run  # noqa: E402

from influence_store.store import Store  # noqa: E402


class Databases:
    """Fresh PostgreSQL databases on one server, dropped at the end."""

    def __init__(self, server: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        self.base, self.names = make_url(server), []
        self.admin = psycopg.connect(host=self.base.host, port=self.base.port, user=self.base.username,
                                     password=self.base.password, dbname=self.base.database or "postgres",
                                     autocommit=True)

    def fresh(self) -> str:
        name = f"bench_scale_{uuid.uuid4().hex[:10]}"
        self.admin.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return self.base.set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        for name in self.names:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.close()


def write_seconds(location: str, scores: np.ndarray, chunk: int) -> float:
    store = Store(location)
    run_id, train_ids, test_ids = make_run(store, scores.shape[1], scores.shape[0])
    started = time.perf_counter()
    for index, start in enumerate(range(0, len(test_ids), chunk)):
        store.write_chunk(run_id, index, test_ids[start:start + chunk], train_ids, scores[start:start + chunk])
    seconds = time.perf_counter() - started
    assert store.run(run_id)["chunks_done"] == -(-len(test_ids) // chunk)
    store.engine.dispose()
    return seconds


def write_speed(databases: Databases, folder: Path, quick: bool, rounds: int) -> None:
    n_test, n_train, chunk = (20, 5_000, 5) if quick else (100, 10_000, 10)
    scores = np.random.default_rng(0).standard_normal((n_test, n_train))
    best = {"postgresql": float("inf"), "sqlite": float("inf")}
    for r in range(rounds):
        best["postgresql"] = min(best["postgresql"], write_seconds(databases.fresh(), scores, chunk))
        best["sqlite"] = min(best["sqlite"], write_seconds(str(folder / f"write-{r}.db"), scores, chunk))
    print(f"\n1. write_chunk, {n_test * n_train:,} scores in chunks of {chunk} x {n_train:,}, best of {rounds}")
    for name, seconds in best.items():
        print(f"   {name:<11} {seconds:7.2f} s   {n_test * n_train / seconds:12,.0f} scores/s")
    print(f"   PostgreSQL / SQLite speed: {best['sqlite'] / best['postgresql']:.2f}x")


def run_processes(location: str, count: int, args: list[str], workers: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from influence_store.cli import main; main()", "--db", location, "run",
               f"{ROOT / 'benchmarks' / 'scale_task.py'}:task", *args, "--quiet", "--json"]
    started = time.perf_counter()
    if workers:
        processes = [subprocess.Popen(command + ["--workers", str(count)], env=env, stdout=subprocess.PIPE)]
    else:
        processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE) for _ in range(count)]
    for p in processes:
        out, _ = p.communicate()
        assert p.returncode == 0, out
    return time.perf_counter() - started


def shared_run(databases: Databases, quick: bool, rounds: int, n_test: int | None, depth: int | None) -> None:
    n_train, n_test, depth = ("600", str(n_test or 40), str(depth or 20)) if quick else (
        "1200", str(n_test or 480), str(depth or 40))
    args = ["-t", "n_train", n_train, "-t", "n_test", n_test, "-a", "lissa", "-o", "depth_iters", depth,
            "-o", "scale", "100", "--test-chunk-size", "8"]
    configs = {"1 process": (1, False), "2 processes by hand": (2, False), "--workers 2 (Dask)": (2, True)}
    best = dict.fromkeys(configs, float("inf"))
    first_scores, shares = None, {}
    for _ in range(rounds):
        for name, (count, workers) in configs.items():
            location = databases.fresh()
            best[name] = min(best[name], run_processes(location, count, args, workers))
            store = Store(location)
            run = store.run(1)
            assert run["status"] == "done" and run["chunks_done"] == run["chunks_total"], run
            matrix = np.array([[v for _, v in sorted(store.score_rows(1, t))] for t in store.example_ids(1, "test")])
            owners = [o for (o,) in store.engine.connect().exec_driver_sql(
                "SELECT owner FROM run_claims WHERE run_id = 1 AND block >= 0")]
            shares[name] = sorted((owners.count(o) for o in set(owners)), reverse=True)
            first_scores = matrix if first_scores is None else first_scores
            assert np.array_equal(matrix.view(np.int64), first_scores.view(np.int64)), name
            store.engine.dispose()
    print(f"\n2. one run ({n_train} train x {n_test} test, LiSSA depth {depth}, blocks of 8 test examples) into "
          f"PostgreSQL, wall seconds, best of {rounds}")
    for name, seconds in best.items():
        print(f"   {name:<22} {seconds:7.1f} s   speed-up {best['1 process'] / seconds:4.2f}x   "
              f"blocks per process (last round): {shares[name]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("INFLUENCE_STORE_TEST_POSTGRES"),
                        help="server URL (default: $INFLUENCE_STORE_TEST_POSTGRES)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", choices=["write", "run"], default=None)
    parser.add_argument("--test", type=int, default=None,
                        help="test examples of the shared run (480, at most 597; --quick: 40): more amortizes start-up")
    parser.add_argument("--depth", type=int, default=None, help="LiSSA steps per block of the shared run (40)")
    options = parser.parse_args()
    if not options.postgres:
        sys.exit("give --postgres URL (start one with: bash scripts/postgres_server.sh 54331)")
    rounds = options.rounds or (1 if options.quick else 3)
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
    databases = Databases(options.postgres)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if options.only in (None, "write"):
                write_speed(databases, Path(tmp), options.quick, rounds)
            if options.only in (None, "run"):
                shared_run(databases, options.quick, rounds, options.test, options.depth)
    finally:
        databases.close()
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
