"""Dask as the launcher: the same run loop on N worker processes, sharing one run through the store.

Each Dask task is one ordinary ``execute_run`` in a worker process: it loads the task, registers (or
joins) the run and claims blocks from the store until none is left, exactly like a second process
started by hand would. So Dask only starts processes; the store decides who computes what, and a worker
that dies loses nothing but its block's lease. The workers must reach the database (for several
machines: PostgreSQL) and load the task spec (same files and packages on every worker).
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import InfluenceStoreError


def _dask():
    try:
        import distributed
    except ImportError:
        raise InfluenceStoreError("Dask is not installed; install the extra: pip install 'influence-store[dask]'") \
            from None
    return distributed


def execute_run_on_dask(run: Callable, store, spec, settings, *, workers: int | None = None,
                        scheduler: str | None = None, **run_options: Any) -> tuple[int, str]:
    """Call ``run`` (``execute_run``, handed in so that this module does not import it back) on ``workers``
    local single-threaded worker processes (a LocalCluster), or on every worker of the Dask cluster at
    ``scheduler``; returns the run's id and outcome."""
    if not isinstance(spec, str):
        raise InfluenceStoreError("a run on Dask workers needs a task spec (FILE.py:FUNCTION or MODULE:FUNCTION) "
                                  "that every worker can load, not a Task object")
    if workers is not None and scheduler is not None:
        raise InfluenceStoreError("give either a number of local workers or a scheduler address, not both")
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise InfluenceStoreError(f"workers must be a positive whole number, got {workers!r}")
    if store.is_sqlite and scheduler is not None:
        raise InfluenceStoreError("a Dask cluster's workers need a database server they all reach "
                                  "(postgresql+psycopg://USER@HOST:PORT/DB), not a SQLite file")
    distributed = _dask()
    cluster = None
    try:
        if scheduler is None:
            import logging

            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(scheduler, timeout="30s")
    except OSError as exc:
        raise InfluenceStoreError(f"cannot reach the Dask scheduler {scheduler!r}: {exc}") from None
    try:
        count = workers or max(1, len(client.scheduler_info()["workers"]))
        futures = [client.submit(run_in_worker, run, store.url, spec, settings, run_options, pure=False)
                   for _ in range(count)]
        results = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    outcomes = {r["outcome"] for r in results}
    outcome = "computed" if "computed" in outcomes else "resumed" if "resumed" in outcomes else "existing"
    return results[0]["run_id"], outcome


def run_in_worker(run: Callable, url: str, spec: str, settings, run_options: dict) -> dict:
    """One Dask task: an ordinary run in this worker process, with single-threaded torch (the workers are
    the parallelism)."""
    import torch

    from .store import Store

    torch.set_num_threads(1)
    store = Store(url)
    try:
        return run(store, spec, settings, **run_options).to_dict()
    finally:
        store.engine.dispose()
