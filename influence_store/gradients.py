"""Per-example gradients and Hessian-vector products over the tracked parameters.

Parameters are handled as one flat vector of size ``p`` (in the order of the tracked names). The
model itself is never mutated: a detached copy of the tracked parameters (and of every other parameter
and buffer, moved to the compute device and dtype) is passed through ``torch.func.functional_call``.
Per-example gradients use per-sample hooks on linear and embedding layers, else ``vmap(grad(...))``, over
batches sized by a memory budget (``grad_paths.py``). HVPs are reverse-over-reverse over the whole training
set and double backward (vectors vmapped) over LiSSA's batches, each graph built once and applied to blocks of
vectors; on the CPU a piece stays near a cache's worth of
tensors, and an iterative solver's whole-set graphs are kept between calls. The dense Hessian is the same
map applied to the identity. Sizes come from ``plan.py``'s cost model: what one example's autograd graph
holds is measured once (saved-tensor hooks), not guessed from the parameter count.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from .errors import InfluenceStoreError
from .grad_paths import PerExampleGradients, _first_line
from .pieces import by_rows, kept_sums_in_threads, threads_pay
from .plan import WORK_SHARE, activation_sizes, default_budget_mb
from .task import Task
from .train_mode import model_in_mode

CPU_PIECE_BYTES = 32 * 2**20  # an HVP piece's (example, vector) tensors on the CPU: about a cache's worth
CPU_PIECE_VECTORS = 8  # the example batches leave room for this many vectors per piece
CPU_WIDEST_BYTES = 4 * 2**20  # with the set in several batches (a thread each): a piece's widest tensor
HVP_STRATEGIES = ("reverse-over-reverse", "double-backward", "per-vector")  # in order of preference


class _LossModule(torch.nn.Module):
    """Wraps model + loss so functional_call reparametrizes the model inside the user's loss."""

    def __init__(self, model: torch.nn.Module, loss) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch):
        return self._loss(self.model, batch)


class TrackedModel(PerExampleGradients):
    """The task's model seen as a function of the flat vector of tracked parameters."""

    def __init__(self, task: Task, tracked: Sequence[str], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, memory_budget_mb: float | None = None, model_mode: str = "eval",
                 seed: int = 0, verbose: bool = False) -> None:
        self.task = task
        self.device = torch.device(device)
        named = dict(task.model.named_parameters())
        missing = [n for n in tracked if n not in named]
        if missing:
            raise InfluenceStoreError(f"tracked parameter(s) {missing[:3]} do not exist in the model")
        if not tracked:
            raise InfluenceStoreError("no parameters are tracked; choose a freezing policy that keeps some")
        self.dtype = dtype or named[tracked[0]].dtype
        self.names = list(tracked)
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.num_params = sum(self.sizes)
        self.l2 = float(task.l2)
        # None: a share of the memory the machine (or the GPU) has free; an explicit budget always wins.
        self.memory_budget_mb = float(memory_budget_mb) if memory_budget_mb is not None else default_budget_mb(
            self.device)
        self.memory_budget = int(self.memory_budget_mb * 2**20)
        self._module = _LossModule(task.model, task.loss)
        # Every other tensor of the model, moved and cast once: the model object stays untouched.
        self._fixed = {f"model.{n}": self._cast(p.detach()) for n, p in task.model.named_parameters()
                       if n not in set(self.names)}
        self._fixed.update({f"model.{n}": self._cast(b) for n, b in task.model.named_buffers()})
        self.flat = torch.cat([self._cast(named[n].detach()).reshape(-1) for n in self.names])
        if model_mode not in ("eval", "train"):
            raise InfluenceStoreError(f"unknown model mode {model_mode!r}; use eval or train")
        self.mode = model_mode  # the mode of training-example gradients (test gradients and HVPs: eval)
        self.seed = int(seed)
        self.verbose = verbose
        self.grad_path: dict[str, str] = {}
        self.grad_strategy = self._first_path()  # "hooks?", "hooks", "vmap" or "loop"
        self.hvp_strategy = ""  # the strategy of the last graph built (HVP_STRATEGIES)
        self.hvp_failed: set[str] = set()  # strategies that failed on this model: not tried again
        self._whole_set_seen = False  # a whole-set product was made: the next one means an iterative solver
        self._whole_set_settled = False  # a whole-set product has worked: its strategy is settled for the model
        self._kept_graphs: tuple[int, dict] | None = None  # (examples per batch, products by batch start)
        self.notes: list[str] = []

    # ---------- plumbing ----------
    def _cast(self, t: Tensor) -> Tensor:
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _prepare(self, batch: Any) -> Any:
        return tree_map(lambda t: self._cast(t) if isinstance(t, Tensor) else t, batch)

    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(flat, self.sizes)
        params = {f"model.{n}": piece.view(shape) for n, piece, shape in zip(self.names, pieces, self.shapes)}
        params.update(self._fixed)
        return params

    def _losses(self, flat: Tensor, batch: Any) -> Tensor:
        return functional_call(self._module, self._params(flat), (batch,))

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode for the duration (dropout off), restoring the user's mode afterwards."""
        with self.model_mode("eval"):
            yield

    @contextlib.contextmanager
    def model_mode(self, mode: str = "eval", seed: int = 0) -> Iterator[None]:
        """The model in ``mode`` for the duration, restoring the user's mode afterwards.

        ``"train"`` (dropout on) draws its random numbers from a private generator seeded with the run's
        seed and ``seed``, so the same call gives the same gradients in every run, and the caller's global
        random state is left as it was.
        """
        with model_in_mode(self.task.model, training=mode == "train"):
            if mode == "train":
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed * 1_000_003 + seed)
                    yield
            else:
                yield

    def chunk_size(self, per_item_floats: int, cap: int = 4096) -> int:
        """How many items of ``per_item_floats`` floats fit the memory budget (with working room)."""
        return max(1, min(cap, self.memory_budget // max(1, 4 * per_item_floats * self.itemsize)))

    @property
    def itemsize(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def activation_floats(self) -> int:
        """Floats one training example adds to an autograd graph (measured once: ``plan.activation_sizes``)."""
        return self._activations[0]

    def widest_floats(self) -> int:
        """Floats one example adds to the widest single tensor of its graph (a wide layer's output): the
        elementwise ops of an HVP stream through tensors of this width."""
        return self._activations[1]

    @functools.cached_property
    def _activations(self) -> tuple[int, int]:
        return activation_sizes(self._saved_sizes, len(self.task.train), guess=self.num_params // 8 + 64)

    def _saved_sizes(self, indices: list[int]) -> list[int]:
        """The sizes of the tensors a forward pass over these training examples saves for backward, in order."""
        sizes: list[int] = []

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel())
            return t

        flat = self.flat.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.eval_mode():
            self._losses(flat, self.batch("train", indices)).sum()
        return sizes

    def batch(self, split: str, indices: Sequence[int]) -> Any:
        return self._prepare(self.task.batch(split, indices))

    # ---------- losses ----------
    def losses(self, split: str, indices: Sequence[int] | None = None) -> Tensor:
        """Per-example losses; checks their shape and names the first non-finite example."""
        n = len(getattr(self.task, split))
        indices = list(range(n)) if indices is None else list(indices)
        out = []
        step = self.chunk_size(self.num_params // 8 + 64)
        with torch.no_grad(), self.eval_mode():
            for start in range(0, len(indices), step):
                idx = indices[start:start + step]
                values = self._losses(self.flat, self.batch(split, idx))
                if not isinstance(values, Tensor) or values.shape != (len(idx),):
                    shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                    raise InfluenceStoreError(
                        f"task loss must return one value per example (shape [{len(idx)}]) but returned "
                        f"{shape}; use reduction='none'")
                out.append(values.detach().to(torch.float64))
        losses = torch.cat(out)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            key = self.task.keys(split)[indices[int(bad[0])]]
            raise InfluenceStoreError(
                f"loss is {losses[int(bad[0])].item()} for {split} example {key!r}; fix the example or the model")
        return losses

    # ---------- gradients ----------
    def grad_chunks(self, split: str, indices: Sequence[int] | None = None) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (indices, per-example gradients [m, p]) in chunks that fit the memory budget."""
        n = len(getattr(self.task, split))
        indices = list(range(n)) if indices is None else list(indices)
        step = self.grad_chunk_size()
        for start in range(0, len(indices), step):
            idx = indices[start:start + step]
            yield idx, self.per_example_grads(split, idx)

    def grad_chunk_size(self) -> int:
        """Examples per per-example-gradient chunk: each holds its gradient and its own graph."""
        return self.chunk_size(self.num_params + 2 * self.activation_floats())

    # ---------- curvature ----------
    def hvp(self, vectors: Tensor, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """``(H_batch + l2 I) v`` for each row v of ``vectors`` [k, p]; H_batch is the mean-loss
        Hessian over the training examples at ``indices`` (all of them when None).

        A whole-set product whose graphs fit the budget builds them all first (in this thread: the forward
        pass reparametrizes the model) and then applies them one thread per batch (pieces.py). A second
        such product means an iterative solver (CG, refinement): from then on the graphs are kept, and only
        the second backward pass runs per call (about a quarter less work per product)."""
        vectors = vectors.to(self.device, self.dtype)
        whole = indices is None
        if whole:
            indices = range(len(self.task.train))
        else:
            indices = indices.tolist() if isinstance(indices, Tensor) else [int(i) for i in indices]
        rows, examples = self.hvp_chunks(len(vectors), len(indices))
        fit, kept = whole and self._graphs_fit(), None
        if fit and self._whole_set_seen:
            if self._kept_graphs is None or self._kept_graphs[0] != examples:
                self._kept_graphs = (examples, {})
            kept = self._kept_graphs[1]
        self._whole_set_seen |= whole
        starts = list(range(0, len(indices), examples))
        total = torch.zeros_like(vectors)
        with self.eval_mode():  # examples outside, vectors inside: one graph per example batch
            if fit and threads_pay(starts, self.device):
                graphs = {} if kept is None else kept  # this call's only, or kept for the solver's next calls
                if not self._whole_set_settled:  # one vector through the first graph settles the strategy
                    self._hvp_sum(vectors[:1], lambda: self.batch("train", indices[:examples]), 1,
                                  torch.zeros_like(vectors[:1]), graphs, 0, whole=True)
                for start in starts:
                    self._kept_products(graphs, start, lambda: self.batch("train", indices[start:start + examples]),
                                        whole=True)
                kept_sums_in_threads(graphs, starts, vectors, rows, into=total)
            else:
                for start in starts:
                    part = indices[start:start + examples]
                    self._hvp_sum(vectors, lambda: self.batch("train", part), rows, total, kept, start, whole)
        return total.div_(len(indices)).add_(vectors, alpha=self.l2)

    def hvp_chunks(self, num_vectors: int, num_examples: int) -> tuple[int, int]:
        """(vectors, examples) per HVP piece: every vector in flight holds a few p-vectors, and every
        (example, vector) pair the second backward pass through that example's graph.

        On the CPU a piece is also kept near ``CPU_PIECE_BYTES`` of those pairs' tensors: the products are
        bound by memory traffic, and a piece whose tensors stay in cache runs about twice as fast as one
        that streams through RAM (docs/engine.md, "Curvature"); with the set in several batches (a thread
        each) its widest tensor also stays under ``CPU_WIDEST_BYTES``. The example batches do not depend
        on the number of vectors, so a solver's kept graphs serve all its calls. The sizes depend only on
        the model and the counts, so a block's products are the same bits in any process."""
        act = self.activation_floats()
        rows = self.chunk_size(4 * self.num_params + act, cap=max(1, num_vectors))
        pairs = max(1, CPU_PIECE_BYTES // (act * self.itemsize)) if self.device.type == "cpu" else None
        if pairs:
            examples = min(self.chunk_size(3 * CPU_PIECE_VECTORS * act, cap=max(1, num_examples)),
                           max(1, pairs // CPU_PIECE_VECTORS))
        else:
            examples = self.chunk_size(3 * rows * act, cap=max(1, num_examples))
        examples = math.ceil(num_examples / math.ceil(num_examples / examples))  # equal batches
        rows = min(rows, self.chunk_size(3 * examples * act, cap=max(1, num_vectors)))
        if pairs:
            rows = min(rows, max(1, pairs // examples))
            if examples < num_examples:  # a piece per thread: its widest tensor near the core's own cache
                rows = min(rows, max(1, CPU_WIDEST_BYTES // (examples * self.widest_floats() * self.itemsize)))
        rows = math.ceil(num_vectors / math.ceil(num_vectors / rows)) if num_vectors else rows  # equal blocks
        return rows, examples

    def _graphs_fit(self) -> bool:
        """Whether the whole training set's graphs (a few times its saved activations) fit half the work
        share (the HVP pieces themselves use the other half at most)."""
        graph_bytes = 4 * self.activation_floats() * len(self.task.train) * self.itemsize
        return graph_bytes <= WORK_SHARE / 2 * self.memory_budget

    def _hvp_sum(self, vectors: Tensor, make_batch, rows: int, into: Tensor, kept: dict | None = None,
                 key: int = 0, whole: bool = False) -> Tensor:
        """Sum over the batch's examples of ``H_i v`` for every row of ``vectors``, ``rows`` vectors at a
        time through one graph (``_products``). The sums are added to ``into``; ``kept`` holds the graphs kept
        by batch start (``key`` is this batch's), a fresh dict when they are not kept."""
        kept = {} if kept is None else kept
        while True:
            try:
                by_rows(self._kept_products(kept, key, make_batch, whole), vectors, rows, into)
                break
            except InfluenceStoreError:
                raise
            except Exception as exc:  # torch.func cannot transform the model, or an op lacks a batching rule
                failed = self._strategy(whole)
                if failed == HVP_STRATEGIES[-1]:
                    raise
                kept.clear()
                self.hvp_failed.add(failed)
                self.notes.append(f"HVPs by {self._strategy(whole)}: {failed} failed ({_first_line(exc)})")
        self._whole_set_settled |= whole
        return into

    def _kept_products(self, kept: dict, key: int, make_batch, whole: bool = False):
        if key not in kept:
            kept[key] = self._products(make_batch(), self._strategy(whole))
        return kept[key]

    def _strategy(self, whole: bool) -> str:
        """Whole-set products (CG, exact, power iteration: many vectors through each graph, often kept for a
        solver's next calls) start at reverse-over-reverse, whose graph costs more to build and less to apply
        (1.1-1.2x faster there); a LiSSA batch's graph, built for one call, starts at double backward (1.0-1.3x
        faster there, and no ``grad`` transform). A strategy that failed on the model is skipped. The choice
        depends only on the model and the call, never on timings, so a run repeats bit for bit."""
        start = 0 if whole else 1
        return next(s for s in HVP_STRATEGIES[start:] if s not in self.hvp_failed)

    def _products(self, batch: Any, strategy: str):
        """``v -> sum_i H_i v`` over the batch for a block of vectors, its graph built here once (attention by
        its plain math kernel: the fused ones have no second derivative), by ``strategy``:

        - ``reverse-over-reverse``: the pullback of ``grad`` (``vjp``), vmapped over the vectors;
        - ``double-backward``: a retained ``create_graph`` gradient, the vectors vmapped by torch.func over
          the second backward pass only (so it serves models torch.func cannot trace);
        - ``per-vector``: the same, one vector at a time (an op of the second pass has no batching rule).
        """
        self.hvp_strategy = strategy
        with sdpa_kernel(SDPBackend.MATH):
            if strategy == "reverse-over-reverse":
                _, pullback = vjp(grad(lambda flat: self._losses(flat, batch).sum()), self.flat.detach())
                return vmap(lambda cotangent: pullback(cotangent)[0])
            flat = self.flat.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._losses(flat, batch).sum(), flat, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:  # loss linear in the tracked parameters: H = 0
            return torch.zeros_like

        def product(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv

        if strategy == "double-backward":
            return vmap(product)
        return lambda block: torch.stack([product(v) for v in block])

    def dense_hessian(self) -> Tensor:
        """The full training Hessian (with ``l2 I``) as a [p, p] float64 matrix.

        Built as ``hvp`` of the identity: one graph per example batch, applied to every column block."""
        p = self.num_params
        h = self.hvp(torch.eye(p, device=self.device, dtype=self.dtype)).to(torch.float64)
        return (h + h.T) / 2

    def batch_stream(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless shuffled epochs of training indices, like a shuffled DataLoader that cycles."""
        n = len(self.task.train)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                yield order[start:start + batch_size]

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.task.train) / batch_size)
