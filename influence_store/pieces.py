"""Adding an HVP's per-batch products into a result: serially, or one thread per example batch.

Whole-set HVPs on the CPU are bound by memory traffic through elementwise ops (adds, muls, ``tanh_backward``
over examples x vectors x width). Once every example batch's graph is built (a whole-set product builds them
all first, and an iterative solver keeps them), the batches' products are independent, so one thread per
batch, each with one intra-op thread, keeps each core on its own cache-sized piece instead of both cores
meeting at every op (1.17-1.29x per 10-vector product on the 100k-parameter MLP; docs/engine.md,
"Curvature"). The batches' sums are added in batch order, as the serial loop adds them."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch
from torch import Tensor


def by_rows(products, vectors: Tensor, rows: int, into: Tensor) -> Tensor:
    """``products`` of ``rows`` vectors at a time, added to ``into``. A missing batching rule fails on the
    first piece, before anything is added, so the caller can fall back without counting a vector twice."""
    for r in range(0, len(vectors), rows):
        into[r:r + rows] += products(vectors[r:r + rows]).detach()
    return into


def threads_pay(starts: Sequence[int], device: torch.device) -> bool:
    """On the CPU, with more than one example batch and more than one thread (the caller has every batch's
    graph built first)."""
    return device.type == "cpu" and len(starts) > 1 and torch.get_num_threads() > 1


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """This thread's float arithmetic, and that of the threads it starts meanwhile (OpenMP's included, when
    they are not running yet), treats subnormal numbers as zero; the thread's own setting is restored after.
    Gradients of examples a model is sure of are full of them (softmax probabilities of 1e-40), and a CPU op
    that meets one takes a slow path: a matrix product of subnormals ran 200x slower, whole HVPs of a
    1M-parameter MLP 4.8x (docs/engine.md, "Subnormal numbers"). What they change is below any score's
    rounding. Every ``execute_run`` computes inside it; the HVP threads set it for themselves."""
    was = bool((torch.tensor([1e-40]) * 1.0 == 0).item())  # already on: a float32 subnormal reads as zero
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


# by process and size, kept for the process (new threads would each start their own OpenMP state on every
# call); by process, because a forked child has the dict but not the threads
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def kept_sums_in_threads(kept: dict, starts: Sequence[int], vectors: Tensor, rows: int, into: Tensor) -> Tensor:
    """The batches at ``starts`` applied to ``vectors`` from their built graphs, one thread per batch at a time,
    and added to ``into`` in batch order (as the serial loop adds them)."""
    threads = torch.get_num_threads()
    key = (os.getpid(), threads)
    pool = _POOLS.get(key) or _POOLS.setdefault(key, ThreadPoolExecutor(threads, "influence-store-hvp",
                                                                         initializer=torch.set_flush_denormal,
                                                                         initargs=(True,)))  # see above
    torch.set_num_threads(1)
    try:
        parts = list(pool.map(lambda start: by_rows(kept[start], vectors, rows, torch.zeros_like(vectors)), starts))
    finally:
        torch.set_num_threads(threads)
    for part in parts:
        into += part
    return into
