"""The cost plan of a run: how much memory to use and how the work is ordered within it.

Cost is kept flat in the number of test examples by solving inverse-HVPs for a *block* of test vectors
as large as memory allows, then scoring the block against the training set in one streamed pass.
Training gradients are kept in memory when they fit (one gradient pass for the whole run); otherwise
each block costs one pass, so blocks are made as large as the budget allows. Stored chunks (the unit
of storage and of resuming) are smaller than blocks and fixed by the run's stored chunk size; a block
is a whole number of chunks, so the plan never changes which scores a chunk holds.

The budget defaults to a share of the memory the machine has available (of the GPU's free memory on
CUDA); an explicit budget always wins. The plan is printed before a long run and stored with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

DEFAULT_SHARE = 0.25  # of the memory available when the run starts
FALLBACK_BUDGET_MB = 1024.0  # when the machine does not say how much it has
MAX_SCORES_PER_CHUNK = 4_000_000  # a stored chunk is one transaction: keep it to ~32 MB of float64
WORK_SHARE = 0.25  # of the budget kept for gradient chunks, HVP batches and the Hessian's blocks


def available_memory_mb(device: Any = "cpu") -> float | None:
    """Memory the process could use now: free GPU memory on CUDA, else MemAvailable (or all RAM)."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_mb(device: Any = "cpu") -> float:
    """A quarter of the available memory: room for the other processes and for allocator slack."""
    available = available_memory_mb(device)
    return FALLBACK_BUDGET_MB if available is None else max(64.0, DEFAULT_SHARE * available)


@dataclass
class Plan:
    """What a run will do and hold, decided before it starts (see ``make_plan``)."""

    memory_budget_mb: float
    budget_source: str  # "given" or "auto"
    num_params: int
    n_train: int
    n_test: int
    activation_floats: int  # per example, measured
    test_chunk_size: int  # test examples per stored chunk
    test_block_size: int  # test vectors per inverse-HVP call (a whole number of chunks)
    test_blocks: int
    train_grads_cached: bool
    train_passes: int  # gradient passes over the training set for the scores
    train_grad_chunk: int  # training examples per gradient chunk
    self_influence_block: int  # training vectors per inverse-HVP call for self-influence
    estimated_peak_mb: float
    approximator: str
    approximator_work: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """A few lines for the terminal before the work starts."""
        cached = "kept in memory" if self.train_grads_cached else "recomputed for each test block"
        return "\n".join([
            f"plan: {self.n_test} test x {self.n_train} train examples, {self.num_params:,} parameters, "
            f"memory budget {self.memory_budget_mb:,.0f} MB "
            f"({'as given' if self.budget_source == 'given' else 'a quarter of the available memory'})",
            f"  {self.approximator}: {self.approximator_work}",
            f"  {self.test_blocks} test block(s) of up to {self.test_block_size} vectors, stored in chunks of "
            f"{self.test_chunk_size}",
            f"  {self.train_passes} gradient pass(es) over the training set (gradients {cached}); "
            f"self-influence {'reuses them' if self.train_grads_cached else 'adds one more'}",
            f"  estimated peak {self.estimated_peak_mb:,.0f} MB",
        ])


def activation_sizes(saved_sizes: Callable[[list[int]], list[int]], n: int, guess: int) -> tuple[int, int]:
    """(all, widest): the floats one training example adds to an autograd graph, and to its widest single
    tensor, from ``saved_sizes`` (the sizes of the tensors a forward pass over some of the ``n`` training
    examples saves for backward). Each is the difference between a 3-example and a 1-example pass, halved, so
    tensors that do not grow with the batch (the parameters) cancel out. The widest is 1 (no cap on HVP
    pieces) where it is unknown: the graph's structure changes with the batch. ``guess`` stands in for the
    whole when the pass fails (the real pass reports real errors)."""
    try:
        one = saved_sizes([0])
        three = saved_sizes([0, 1, 2]) if n >= 3 else one
    except Exception:  # noqa: BLE001
        return guess, 1
    every = max(1, (sum(three) - sum(one)) // 2 if n >= 3 else sum(one))
    if n < 3 or len(one) != len(three):  # no pairing of the tensors: the widest is unknown, so nothing caps it
        return every, 1
    return every, max(1, min(every, max(((b - a) // 2 for a, b in zip(one, three)), default=1)))


def stored_chunk_size(model, requested: int | None) -> int:
    """Test examples per stored chunk: what was asked for, else what one transaction should hold."""
    if requested is not None:
        return int(requested)
    n_train = len(model.task.train)
    by_memory = model.chunk_size(model.num_params * 6 + 4 * n_train, cap=1024)
    return max(1, min(by_memory, MAX_SCORES_PER_CHUNK // max(1, n_train)))


def make_plan(model, approximator, test_chunk_size: int, budget_given: bool = True,
              flat_train_grads: bool = True) -> Plan:
    """Decide blocks, caching and passes from the budget and what each item holds.

    A test vector in a block holds ``working_vectors`` p-vectors (its gradient, the approximator's
    state and result; declared by the approximator, 6 when it does not say) and its float64 score row.
    ``flat_train_grads=False``: the approximator takes the dot products with the training gradients itself
    (``training_dot_products``), so there are no flat gradients to cache.
    """
    n_train, n_test, p = len(model.task.train), len(model.task.test), model.num_params
    itemsize, budget = model.itemsize, model.memory_budget
    per_vector = int(getattr(approximator, "working_vectors", 6)) * p * itemsize + 8 * n_train
    grads_bytes = n_train * p * itemsize
    work = WORK_SHARE * budget
    room = budget - work
    chunk = max(1, min(test_chunk_size, n_test or 1))
    all_chunks = math.ceil(n_test / chunk) if n_test else 0
    # Cache the training gradients when they fit beside at least one stored chunk of test vectors.
    cached = flat_train_grads and grads_bytes + chunk * per_vector <= room
    left = room - (grads_bytes if cached else 0)
    block_chunks = max(1, min(all_chunks or 1, int(left // max(1, chunk * per_vector))))
    block = block_chunks * chunk
    blocks = 1 + math.ceil((all_chunks - 1) / block_chunks) if all_chunks else 0  # chunk 0 is a block alone
    self_block = max(1, min(n_train, int(left // max(1, per_vector))))
    grad_chunk = model.grad_chunk_size()
    peak = (grads_bytes if cached else 0) + min(block, n_test) * per_vector + work
    return Plan(
        memory_budget_mb=round(model.memory_budget_mb, 1), budget_source="given" if budget_given else "auto",
        num_params=p, n_train=n_train, n_test=n_test,
        activation_floats=model.activation_floats(), test_chunk_size=chunk, test_block_size=block,
        test_blocks=blocks, train_grads_cached=cached, train_passes=1 if cached else max(1, blocks),
        train_grad_chunk=grad_chunk, self_influence_block=self_block, estimated_peak_mb=round(peak / 2**20, 1),
        approximator=approximator.name, approximator_work=_describe_work(approximator, blocks))


def _describe_work(approximator, blocks: int) -> str:
    d = approximator.diagnostics
    if approximator.name == "lissa":
        steps = d.get("steps", "?")
        return (f"{steps} steps x {approximator.options.num_samples} sample(s) per test block, "
                f"{approximator.options.batch_size} examples per HVP ({blocks} recursion(s) for the scores)")
    if approximator.name == "exact":
        return f"dense {approximator.model.num_params}^2 Hessian built once, float64 solve"
    return f"{blocks} inverse-HVP call(s) for the scores"
