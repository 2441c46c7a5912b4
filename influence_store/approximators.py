"""The approximator interface: one required method, ``inverse_hvp``.

An approximator receives the curvature of the training loss as a ``TrackedModel`` (``hvp``,
``dense_hessian``, ``batch_stream``) and turns a batch of vectors [k, p] into approximations of
``(H + ridge)^-1 v`` [k, p]. Everything else (gradients, scoring, storage) is composed on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from .options import NoOptions

if TYPE_CHECKING:  # every plugin imports this module at startup; torch loads only when one computes
    from torch import Tensor

    from .gradients import TrackedModel


class Approximator:
    """Base class for approximator plugins."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any, model: TrackedModel, seed: int = 0) -> None:
        self.options = options
        self.model = model
        self.seed = seed
        self.diagnostics: dict[str, Any] = {}

    def prepare(self) -> None:
        """One-time work before the first ``inverse_hvp`` (factorizations, scale estimates)."""

    @property
    def effective_damping(self) -> float:
        """The ridge this approximator adds to H, recorded with the run."""
        return 0.0

    def state(self) -> bytes | None:
        """What ``prepare`` fitted, stored with the run so a resumed run reuses it (None: nothing)."""
        return None

    def load_state(self, data: bytes) -> None:
        """Called before ``prepare`` with an earlier ``state()``; ignore data that does not fit."""

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """Approximate ``(H + ridge)^-1 v`` for every row v of ``vectors`` [k, p]."""
        raise NotImplementedError

    def training_dot_products(self) -> Callable[[Tensor, Sequence[int]], Tensor] | None:
        """Optional: a function ``(vectors [k, p], train indices) -> vectors @ g_i`` [k, len(indices)] that is
        cheaper than the engine's flat per-example gradients (e.g. from each layer's inputs and output
        gradients). Asked once, after ``prepare``; the engine then never caches flat training gradients.
        None (the default): the engine's flat gradients are used."""
        return None

    def self_influence(self, indices: list[int]) -> Tensor | None:
        """Optional: ``g_i^T (H + ridge)^-1 g_i`` [len(indices)] for those training examples, when the
        approximator has a cheaper way than ``inverse_hvp`` of their flat gradients (None: it has not)."""
        return None
