"""Scores: ``score(i, t) = g_t^T (H + ridge)^-1 g_i``, one block of test examples at a time (see plan.py).

Sign convention (AllenNLP's): a positive score means the training example helps the test example
(removing it would raise the test loss); negative means it hurts. ``score / n_train`` is the
predicted change of the test loss if the training example is removed.
"""

from __future__ import annotations

import hashlib
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .directional import DirectionalDots, directional_pays
from .errors import InfluenceStoreError
from .freezing import tracked_parameters
from .gradients import TrackedModel
from .plan import Plan, make_plan, stored_chunk_size
from .settings import RunSettings
from .task import Task
from .train_mode import check_train_mode

LONG_RUN_WORK = 5e7  # parameters x examples above which a run with progress bars prints its plan first
GRADIENT_CHECK_EXAMPLES = 8  # training examples whose summed loss gradient is checked before a run
SHARED_BLOCKS = 4  # the fewest blocks a run's test chunks (after the first) and its self-influence are solved in
SIGN_CONVENTION = "score = g_test^T (H + ridge)^-1 g_train; positive = helpful, negative = harmful"


@dataclass
class ScoreChunk:
    """Scores of a contiguous block of test examples against every training example."""

    index: int
    test_indices: list[int]
    scores: Tensor  # [len(test_indices), n_train], float64


@dataclass
class ScoreComputation:
    """A prepared computation: read ``settings``/``diagnostics``, then stream ``chunks()``."""

    task: Task
    model: TrackedModel
    approximator: Any
    settings: dict[str, Any]
    test_chunk_size: int
    progress: bool = False
    train_losses: Tensor | None = None
    test_losses: Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    self_influence_parts: int = 1  # the self-influence pass in this many parts (a run fixes it when it starts)
    _train_grads: Tensor | None = None
    _plan: Plan | None = None
    _training_dots: Any = None  # the approximator's training_dot_products(), when it has them

    @property
    def n_train(self) -> int:
        return len(self.task.train)

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.task.test) / self.test_chunk_size)

    def chunk_indices(self, index: int) -> list[int]:
        start = index * self.test_chunk_size
        return list(range(start, min(start + self.test_chunk_size, len(self.task.test))))

    @property
    def plan(self) -> Plan:
        return self._plan

    def chunks(self, skip: Sequence[int] = ()) -> Iterator[ScoreChunk]:
        """Yield every test chunk not in ``skip``; chunk boundaries are fixed, so a resumed
        computation produces exactly the chunks it had not finished.

        The chunks still to do are grouped into test blocks of the plan's size: one inverse-HVP call
        and one pass over the training set per block, then the block's chunks are yielded in order."""
        skipped = set(skip)
        todo = [i for i in range(self.num_chunks) if i not in skipped]
        # A fixed grid of blocks (chunk_grid), so a resumed run computes the missing chunks of each block.
        blocks: dict[tuple[int, int], list[int]] = {}
        for index in todo:
            blocks.setdefault(self.chunk_grid(index), []).append(index)
        bar = _progress(None, self.progress, "test chunks", total=len(todo))
        for block, wanted in blocks.items():
            for chunk in self.block_chunks(block, wanted):
                if bar is not None:
                    bar.update(1)
                yield chunk
        if bar is not None:
            bar.close()

    def chunk_grid(self, index: int) -> tuple[int, int]:
        """The inclusive range of chunks solved together with chunk ``index``: chunk 0 alone (stored early,
        so a run soon has resumable progress), then blocks of ``chunks_per_block`` chunks."""
        if index <= 0:
            return (index, index)
        per_block = self.chunks_per_block
        first = 1 + (index - 1) // per_block * per_block
        return (first, min(first + per_block, self.num_chunks) - 1)

    @property
    def chunks_per_block(self) -> int:
        """How many stored chunks are solved together (one inverse-HVP call, one training pass): as many as
        the plan's memory allows. When the training gradients are cached (a block costs no extra pass), the
        chunks after the first form at least ``SHARED_BLOCKS`` blocks, so that every process sharing a run
        (started by hand, by SLURM, Dask workers) gets work to claim; when they are not, every block is
        another pass over the training set, so there are as few as memory allows."""
        by_memory = max(1, self.plan.test_block_size // self.test_chunk_size)
        if not self.plan.train_grads_cached:
            return by_memory
        return max(1, min(by_memory, math.ceil((self.num_chunks - 1) / SHARED_BLOCKS)))

    def chunk_group(self, indices: Sequence[int]) -> list[ScoreChunk]:
        """Several chunks' scores from one inverse-HVP call and one pass over the training set (the unit
        a process computes after claiming the chunks from the store)."""
        started = time.perf_counter()
        parts = [self.chunk_indices(index) for index in indices]
        scores = self.scores_for([i for part in parts for i in part])
        self.diagnostics["seconds_scoring"] = self.diagnostics.get("seconds_scoring", 0.0) + (
            time.perf_counter() - started)
        self.diagnostics["test_blocks_done"] = self.diagnostics.get("test_blocks_done", 0) + 1
        return [ScoreChunk(index, part, rows)
                for index, part, rows in zip(indices, parts, scores.split([len(part) for part in parts]))]

    def block_chunks(self, block: tuple[int, int], wanted: Sequence[int]) -> list[ScoreChunk]:
        """The ``wanted`` chunks of one block of the grid, computed with the whole block: a chunk's scores
        are then the same bits whichever of its block's chunks were stored before (a resumed block)."""
        wanted = set(wanted)
        return [chunk for chunk in self.chunk_group(range(block[0], block[1] + 1)) if chunk.index in wanted]

    def chunk(self, index: int) -> ScoreChunk:
        """One test chunk's scores."""
        return self.chunk_group([index])[0]

    def scores_for(self, test_indices: Sequence[int]) -> Tensor:
        """Scores [len(test_indices), n_train] as float64: the test gradients' inverse-HVPs in one call,
        then one streamed pass over the training gradients."""
        test_indices = list(test_indices)
        if not test_indices:
            return torch.zeros(0, self.n_train, dtype=torch.float64)
        step = self.model.grad_chunk_size()
        g_test = torch.cat([self.model.per_example_grads("test", test_indices[s:s + step])  # enables gradients itself
                            for s in range(0, len(test_indices), step)])
        _check_finite(g_test, self.model, "test", test_indices)
        ihvp = self._inverse_hvp(g_test)
        del g_test
        dots = None if self._training_dots is None else self._training_dots(ihvp, range(self.n_train))
        if dots is not None:  # the approximator's own pass over the training set, or forward mode's
            self.diagnostics["train_gradient_passes"] = self.diagnostics.get("train_gradient_passes", 0) + 1
            _check_finite(dots.T, self.model, "train", range(self.n_train))
            return dots.cpu()
        if self._training_dots is not None:  # forward mode fell back (directional.py)
            self.diagnostics["training_dots"] = "gradients"
        out = torch.empty(len(test_indices), self.n_train, dtype=torch.float64)
        for idx, g in self.train_grads():
            out[:, idx[0]:idx[-1] + 1] = _dot(ihvp, g)
        return out

    def matrix(self) -> Tensor:
        """The full [n_test, n_train] score matrix."""
        return torch.cat([chunk.scores for chunk in self.chunks()])

    def self_influence(self) -> Tensor:
        """``g_i^T (H + ridge)^-1 g_i`` for every training example, float64 [n_train]: its parts, in order."""
        parts = [self.self_influence_part(part) for part in range(self.self_influence_parts)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def self_influence_range(self, part: int) -> range:
        """The training positions of self-influence part ``part`` (fixed for a run: ``self_influence_parts``)."""
        parts, n = self.self_influence_parts, self.n_train
        return range(part * n // parts, (part + 1) * n // parts)

    def self_influence_part(self, part: int) -> Tensor:
        """Self-influence of one part's training examples (the unit processes sharing a run claim).

        The part's gradients (from the cache, or streamed) are gathered into blocks of the plan's size,
        so an iterative approximator runs one batched solve per block, not one per gradient chunk."""
        positions = self.self_influence_range(part)
        direct = self.approximator.self_influence(list(positions)) if len(positions) else None
        if direct is not None:  # e.g. EK-FAC from each layer's inputs and output gradients
            return direct.to(torch.float64).cpu()
        if self.plan.train_grads_cached and self._train_grads is None:
            for _ in self.train_grads():  # one pass fills the cache that test blocks use too
                pass
        if self._train_grads is not None:
            grads = iter([self._train_grads[positions.start:positions.stop]])
        else:
            grads = (g for _, g in self.model.grad_chunks("train", positions))
        block = self.plan.self_influence_block
        out, pending, rows = [], [], 0
        bar = _progress(None, self.progress, "self-influence", total=len(positions), unit="example")

        def flush():
            g = pending[0] if len(pending) == 1 else torch.cat(pending)
            pending.clear()
            for piece in g.split(block):
                out.append(_dot_rows(self._inverse_hvp(piece), piece))
                if bar is not None:
                    bar.update(len(piece))

        for g in grads:
            pending.append(g)
            rows += len(g)
            if rows >= block:
                flush()
                rows = 0
        if pending:
            flush()
        if bar is not None:
            bar.close()
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def train_grads(self) -> Iterator[tuple[list[int], Tensor]]:
        """Training gradients in chunks; kept in memory when the plan says they fit."""
        if self._train_grads is not None:
            yield list(range(self.n_train)), self._train_grads
            return
        keep = self.plan.train_grads_cached
        cache = None  # filled in place: no second copy of every gradient for a concatenation at the end
        for idx, g in self.model.grad_chunks("train"):
            _check_finite(g, self.model, "train", idx)
            if keep and len(idx) == self.n_train:  # one chunk: it is the cache, no copy
                cache = g
            elif keep:
                if cache is None:
                    cache = torch.empty(self.n_train, g.shape[1], dtype=g.dtype, device=g.device)
                cache[idx[0]:idx[-1] + 1] = g
            yield idx, g
        self.diagnostics["train_gradient_passes"] = self.diagnostics.get("train_gradient_passes", 0) + 1
        if keep:
            self._train_grads = cache

    def _inverse_hvp(self, vectors: Tensor) -> Tensor:
        result = self.approximator.inverse_hvp(vectors)
        if not torch.isfinite(result).all():
            for idx, g in self.model.grad_chunks("train"):  # a NaN gradient poisons the curvature: name it
                _check_finite(g, self.model, "train", idx)
            raise InfluenceStoreError(
                f"approximator {self.approximator.name!r} produced non-finite values; increase damping "
                f"(or for lissa, the scale)")
        return result


def compute_scores(task: Task, approximator: str = "lissa", options: dict | None = None,
                   freeze: str = "all", freeze_options: dict | None = None, device: str = "cpu",
                   seed: int = 0, dtype: str | torch.dtype | None = None, memory_budget_mb: float | None = None,
                   test_chunk_size: int | None = None, progress: bool = False,
                   model_mode: str = "eval", approximator_state: bytes | None = None,
                   self_influence: bool = True) -> ScoreComputation:
    """Prepare an influence computation: choose parameters, check losses, set up the approximator.

    Returns a ``ScoreComputation``: iterate ``.chunks()`` to stream scores, or call ``.matrix()`` and
    ``.self_influence()``. Nothing is computed for a test chunk until it is asked for. With no
    ``memory_budget_mb`` the budget is a share of the available memory; ``.plan`` says how it is used.
    ``model_mode="train"`` takes training-example gradients in train mode (dropout on, as AllenNLP's
    SimpleInfluence does), from a generator seeded with ``seed``; test gradients and HVPs use eval mode.
    ``self_influence=False`` says only the scores are wanted: a few test vectors are then scored by
    forward-mode derivatives when that is cheaper than per-example gradients (directional.py).
    The keywords are those of ``RunSettings`` (settings.py); ``prepare_scores`` takes one.
    """
    settings = RunSettings(approximator=approximator, options=options or {}, freeze=freeze,
                           freeze_options=freeze_options or {}, device=device, seed=seed,
                           dtype=dtype if not isinstance(dtype, torch.dtype) else str(dtype).replace("torch.", ""),
                           memory_budget_mb=memory_budget_mb, test_chunk_size=test_chunk_size, model_mode=model_mode,
                           self_influence=self_influence)
    return prepare_scores(task, settings.resolved(), progress=progress, approximator_state=approximator_state)


def prepare_scores(task: Task, settings: RunSettings, *, tracked: list[str] | None = None, progress: bool = False,
                   approximator_state: bytes | None = None,
                   self_influence_parts: int | None = None) -> ScoreComputation:
    """``compute_scores`` for resolved settings (``settings.resolved()``) and, when the caller has them,
    the tracked parameter names and the self-influence parts of a run that already started."""
    started = time.perf_counter()
    entry, parsed = settings.approximator_plugin()
    device = check_device(settings.device)
    torch_dtype = _dtype(settings.dtype)
    if settings.model_mode == "train":
        check_train_mode(task.model)
    names = tracked if tracked is not None else tracked_parameters(task.model, settings.freeze,
                                                                   settings.freeze_options)
    model = TrackedModel(task, names, device=device, dtype=torch_dtype, memory_budget_mb=settings.memory_budget_mb,
                         model_mode=settings.model_mode, seed=settings.seed, verbose=progress)
    train_losses = model.losses("train")
    test_losses = model.losses("test")
    _check_gradients(model)
    instance = entry.cls(parsed, model, seed=settings.seed)
    if approximator_state is not None:  # what an earlier prepare() fitted for this run
        instance.load_state(approximator_state)
    instance.prepare()
    training_dots = instance.training_dot_products()
    dots_path = "approximator" if training_dots is not None else "gradients"
    if training_dots is None and not settings.self_influence and directional_pays(model, len(task.test)):
        training_dots, dots_path = DirectionalDots(model), "directional"
    chunk = stored_chunk_size(model, settings.test_chunk_size)
    plan = make_plan(model, instance, chunk, budget_given=settings.memory_budget_mb is not None,
                     flat_train_grads=training_dots is None)
    # Parts, like test blocks, let processes sharing a run share its self-influence too.
    parts = self_influence_parts or max(1, min(SHARED_BLOCKS, len(task.train)))
    record = {
        "approximator": settings.approximator,
        "options": settings.options,
        "freeze": settings.freeze,
        "freeze_options": settings.freeze_options,
        "tracked_parameters": names,
        "num_params": model.num_params,
        "tracked_fingerprint": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
        "seed": settings.seed,
        "model_mode": settings.model_mode,
        "device": str(device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "l2": model.l2,
        "effective_damping": instance.effective_damping,
        "sign_convention": SIGN_CONVENTION,
        "test_chunk_size": chunk,
        "self_influence_parts": parts,
        "memory_budget_mb": plan.memory_budget_mb,
        "plan": plan.to_dict(),
        "versions": library_versions(),
    }
    computation = ScoreComputation(task, model, instance, record, chunk, progress=progress,
                                   train_losses=train_losses, test_losses=test_losses, self_influence_parts=parts,
                                   _plan=plan, _training_dots=training_dots)
    computation.diagnostics.update(approximator=instance.diagnostics, grad_notes=model.notes, grad_path=model.grad_path,
                                   plan=plan.to_dict(), training_dots=dots_path,
                                   seconds_prepare=time.perf_counter() - started)
    if progress and plan.num_params * (plan.n_train + plan.n_test) >= LONG_RUN_WORK:  # before a long run
        print(plan.describe(), file=sys.stderr, flush=True)
    return computation


def _check_gradients(model: TrackedModel) -> None:
    """Before any curvature is built: the loss must depend on the tracked parameters (a detached output or a
    forward under ``torch.no_grad()`` would give all-zero scores), with finite gradients (``sqrt`` at 0 gives
    NaN ones from finite losses, which would surface later as a misleading "increase damping")."""
    first = list(range(min(GRADIENT_CHECK_EXAMPLES, len(model.task.train))))
    if not first:
        return
    flat = model.flat.detach().requires_grad_(True)
    with torch.enable_grad(), model.eval_mode():
        loss = model._losses(flat, model.batch("train", first)).sum()
        g = torch.autograd.grad(loss, flat, allow_unused=True)[0] if loss.requires_grad else None
    if g is None:
        raise InfluenceStoreError(
            "the task loss does not depend on the tracked parameters (a detached model output, or a forward "
            "under torch.no_grad()?); compute the loss from the model's output with gradients enabled")
    if not torch.isfinite(g).all():
        raise InfluenceStoreError(
            f"the gradient of the loss over the first {len(first)} training examples is not finite although "
            f"the losses are (e.g. sqrt or log at 0 inside the model); make the model differentiable there")


def _check_finite(grads: Tensor, model: TrackedModel, split: str, indices: Sequence[int]) -> None:
    """Name the first example whose gradient is NaN or inf (its loss is finite: losses() checked that)."""
    bad = (~torch.isfinite(grads)).any(dim=1).nonzero()
    if len(bad):
        key = model.task.keys(split)[indices[int(bad[0])]]
        raise InfluenceStoreError(
            f"the gradient of {split} example {key!r} is not finite although its loss is (e.g. sqrt or log at "
            f"0 inside the model); make the model differentiable there or leave the example out")


def library_versions() -> dict[str, str]:
    from . import __version__

    return {"influence_store": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _dot(ihvp: Tensor, g: Tensor) -> Tensor:
    """In the training gradients' precision: they hold no more than that, and widening all n of them to
    float64 (a copy the size of the cache, then a GEMM at half the speed) costs more than the k vectors'
    rounding to it."""
    return (ihvp.to(g.dtype) @ g.to(ihvp.device).T).to(torch.float64).cpu()


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return (a.to(dtype) * b.to(a.device, dtype)).sum(1).to(torch.float64).cpu()


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InfluenceStoreError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InfluenceStoreError("device {requested!r} requested but CUDA is not available; use {device}",
                                  requested=device, device='device="cpu"')
    return dev


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise InfluenceStoreError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _progress(items, enabled: bool, desc: str, total: int | None = None, unit: str = "chunk"):
    from .phases import bars_wanted

    if not bars_wanted(enabled):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, total=total)
