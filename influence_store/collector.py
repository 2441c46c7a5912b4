"""CPython's cycle collector during a run: paused while the task loads, then kept off what loaded.

Loading a task imports torch (for an AllenNLP archive also AllenNLP, transformers, spaCy, SciPy, ...) and builds
the model and its data: millions of objects that live until the run ends. Triggered by allocations, the collector
traces that growing heap again and again, which cost a fifth of an AllenNLP run's whole process
(``benchmarks/bench_allennlp.py``). So a run pauses it while loading, then freezes what loaded (``gc.freeze``)
so that the compute's collections skip it, and gives those objects back to the collector when the run ends: a
long-lived process (a notebook, a Dask worker) must be able to free a finished run's cyclic garbage.

A process that already disabled the collector or froze objects keeps its own choice; so does a run that starts
while another thread's run has paused or frozen it.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import threading
from typing import Iterator

_OURS = contextvars.ContextVar("influence_store_collector_paused", default=False)
_LOCK = threading.Lock()


@contextlib.contextmanager
def paused_for_run() -> Iterator[None]:
    """The collector paused from here until ``loaded()``; everything back as it was when the block ends. Inside
    such a block (the CLI's ``run`` opening its store first, then ``execute_run``) it is one pause."""
    if _OURS.get():
        yield
        return
    with _LOCK:
        ours = gc.isenabled() and gc.get_freeze_count() == 0
        if ours:
            gc.disable()
    token = _OURS.set(ours)
    try:
        yield
    finally:
        _OURS.reset(token)
        if ours:
            with _LOCK:
                gc.unfreeze()
                gc.enable()


def loaded() -> None:
    """The task has loaded: what exists now lives until the run ends, so the collector skips it from here on."""
    if _OURS.get() and not gc.isenabled():
        gc.freeze()
        gc.enable()
