"""Scores: ``score(i, t) = g_t^T (H + ridge)^-1 g_i``, streamed one chunk of test examples at a time.

Sign convention (AllenNLP's): a positive score means the training example helps the test example
(removing it would raise the test loss); negative means it hurts. ``score / n_train`` is the
predicted change of the test loss if the training example is removed.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .errors import InfluenceStoreError
from .freezing import tracked_parameters
from .gradients import TrackedModel
from .options import options_to_dict, parse_options
from .task import Task

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
    _train_grads: Tensor | None = None

    @property
    def n_train(self) -> int:
        return len(self.task.train)

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.task.test) / self.test_chunk_size)

    def chunk_indices(self, index: int) -> list[int]:
        start = index * self.test_chunk_size
        return list(range(start, min(start + self.test_chunk_size, len(self.task.test))))

    def chunks(self, skip: Sequence[int] = ()) -> Iterator[ScoreChunk]:
        """Yield every test chunk not in ``skip``; chunk boundaries are fixed, so a resumed
        computation produces exactly the chunks it had not finished."""
        todo = [i for i in range(self.num_chunks) if i not in set(skip)]
        for index in _progress(todo, self.progress, "test chunks"):
            started = time.perf_counter()
            test_indices = self.chunk_indices(index)
            scores = self.scores_for(test_indices)
            self.diagnostics["seconds_scoring"] = self.diagnostics.get("seconds_scoring", 0.0) + (
                time.perf_counter() - started)
            yield ScoreChunk(index, test_indices, scores)

    def scores_for(self, test_indices: Sequence[int]) -> Tensor:
        """Scores [len(test_indices), n_train] as float64."""
        g_test = self.model.per_example_grads("test", list(test_indices))  # enables gradients itself
        ihvp = self._inverse_hvp(g_test)
        return torch.cat([_dot(ihvp, g) for _, g in self.train_grads()], dim=1)

    def matrix(self) -> Tensor:
        """The full [n_test, n_train] score matrix."""
        return torch.cat([chunk.scores for chunk in self.chunks()])

    def self_influence(self) -> Tensor:
        """``g_i^T (H + ridge)^-1 g_i`` for every training example, float64 [n_train]."""
        # Stream the gradient chunks (never a list of them), and hand the approximator slices no larger
        # than a test chunk's share: an inverse-HVP needs several times the memory of its input vectors.
        chunks = math.ceil(self.n_train / self.model.chunk_size(self.model.num_params))
        step = self.model.chunk_size(self.model.num_params * 6, cap=1024)
        out = []
        for _, g in _progress(self.train_grads(), self.progress, "self-influence", total=chunks):
            out.extend(_dot_rows(self._inverse_hvp(piece), piece) for piece in g.split(step))
        return torch.cat(out)

    def train_grads(self) -> Iterator[tuple[list[int], Tensor]]:
        """Training gradients in chunks; kept in memory when they fit the budget."""
        if self._train_grads is not None:
            yield list(range(self.n_train)), self._train_grads
            return
        itemsize = torch.finfo(self.model.dtype).bits // 8
        fits = self.n_train * self.model.num_params * itemsize <= self.model.memory_budget
        chunks = []
        for idx, g in self.model.grad_chunks("train"):
            if fits:
                chunks.append(g)
            yield idx, g
        if fits:
            self._train_grads = torch.cat(chunks)

    def _inverse_hvp(self, vectors: Tensor) -> Tensor:
        result = self.approximator.inverse_hvp(vectors)
        if not torch.isfinite(result).all():
            raise InfluenceStoreError(
                f"approximator {self.approximator.name!r} produced non-finite values; increase damping "
                f"(or for lissa, the scale)")
        return result


def compute_scores(task: Task, approximator: str = "lissa", options: dict | None = None,
                   freeze: str = "all", freeze_options: dict | None = None, device: str = "cpu",
                   seed: int = 0, dtype: str | torch.dtype | None = None, memory_budget_mb: float = 256.0,
                   test_chunk_size: int | None = None, progress: bool = False,
                   model_mode: str = "eval") -> ScoreComputation:
    """Prepare an influence computation: choose parameters, check losses, set up the approximator.

    Returns a ``ScoreComputation``: iterate ``.chunks()`` to stream scores, or call ``.matrix()`` and
    ``.self_influence()``. Nothing is computed for a test chunk until it is asked for.
    ``model_mode="train"`` takes training-example gradients in train mode (dropout on, as AllenNLP's
    SimpleInfluence does), from a generator seeded with ``seed``; test gradients and HVPs use eval mode.
    """
    from .plugin_manager import lookup

    started = time.perf_counter()
    entry = lookup("register_approximators", approximator)
    parsed = parse_options(entry.options_cls, options, f"approximator {approximator!r}")
    device = _check_device(device)
    torch_dtype = _dtype(dtype)
    names = tracked_parameters(task.model, freeze, freeze_options)
    model = TrackedModel(task, names, device=device, dtype=torch_dtype, memory_budget_mb=memory_budget_mb,
                         model_mode=model_mode, seed=seed, verbose=progress)
    train_losses = model.losses("train")
    test_losses = model.losses("test")
    instance = entry.cls(parsed, model, seed=seed)
    instance.prepare()
    # Per test example: a few p-vectors (gradient, inverse-HVP, recursion state) and its float64 score
    # row over the training set (counted twice: the per-train-chunk pieces and their concatenation).
    chunk = test_chunk_size or model.chunk_size(model.num_params * 6 + 4 * len(task.train), cap=1024)
    settings = {
        "approximator": approximator,
        "options": options_to_dict(parsed),
        "freeze": freeze,
        "freeze_options": dict(freeze_options or {}),
        "tracked_parameters": names,
        "num_params": model.num_params,
        "tracked_fingerprint": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
        "seed": seed,
        "model_mode": model_mode,
        "device": str(device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "l2": model.l2,
        "effective_damping": instance.effective_damping,
        "sign_convention": SIGN_CONVENTION,
        "test_chunk_size": chunk,
        "versions": library_versions(),
    }
    computation = ScoreComputation(task, model, instance, settings, chunk, progress=progress,
                                   train_losses=train_losses, test_losses=test_losses)
    computation.diagnostics.update(approximator=instance.diagnostics, grad_notes=model.notes, grad_path=model.grad_path,
                                   seconds_prepare=time.perf_counter() - started)
    return computation


def library_versions() -> dict[str, str]:
    from . import __version__

    return {"influence_store": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _dot(ihvp: Tensor, g: Tensor) -> Tensor:
    dtype = torch.promote_types(ihvp.dtype, g.dtype)
    return (ihvp.to(dtype) @ g.to(ihvp.device, dtype).T).to(torch.float64).cpu()


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return (a.to(dtype) * b.to(a.device, dtype)).sum(1).to(torch.float64).cpu()


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InfluenceStoreError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InfluenceStoreError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise InfluenceStoreError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _progress(items, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="chunk", leave=False, total=total)
