"""``exact``: solve with the full Hessian, for models with up to a few thousand tracked parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from influence_store.approximators import Approximator
from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.options import option

if TYPE_CHECKING:  # torch is imported where it runs, so listing plugins stays fast
    import torch


class Exact(Approximator):
    """Exact inverse-HVP: dense Hessian in float64 + damping*I, Cholesky solve (eigh fallback).

    ``H = (1/n) sum_i d2 loss_i + l2 I`` over the tracked parameters; the solve is
    ``(H + damping I)^-1 v``. When ``H + damping I`` is not positive definite (non-convex models),
    the eigendecomposition is used and eigenvalues below ``1e-10 * max|lambda|`` in magnitude are
    dropped (a pseudo-inverse). The min/max eigenvalues are reported, except that above 1,000 parameters a
    successful Cholesky records only the largest (the smallest would cost more than the solve).
    """

    name = "exact"
    working_vectors = 6  # per vector in flight: its gradient and float64 right-hand side and solution

    @dataclass
    class Options:
        damping: float = option(0.0, "ridge added to the Hessian (a true ridge, not scaled)")
        max_params: int = option(5000, "refuse above this many tracked parameters (the Hessian is p x p)")

        def __post_init__(self) -> None:
            if self.damping < 0:
                raise ValueError("damping must be >= 0")
            if self.max_params < 1:
                raise ValueError("max_params must be >= 1")

    @property
    def effective_damping(self) -> float:
        return self.options.damping

    def prepare(self) -> None:
        import torch

        p = self.model.num_params
        if p > self.options.max_params:
            raise InfluenceStoreError(
                "exact needs a {p}x{p} Hessian, above max_params={max_params}; use {approximator_lissa}, or track "
                "fewer parameters with {freeze_fewer}", p=p, max_params=self.options.max_params,
                approximator_lissa='approximator="lissa"', freeze_fewer='freeze="last-layer" / "regex" / "modules"')
        h = self.model.dense_hessian()
        h.diagonal().add_(self.options.damping)
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            self.diagnostics.update(zip(("min_eigenvalue", "max_eigenvalue"), _extreme_eigenvalues(h)))
            self.diagnostics["solver"] = "cholesky"
            self._solve = lambda b: torch.cholesky_solve(b, factor)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(h)
            self.diagnostics.update(min_eigenvalue=float(eigenvalues[0]), max_eigenvalue=float(eigenvalues[-1]))
            self.diagnostics["solver"] = "eigh-pseudo-inverse"
            keep = eigenvalues.abs() > 1e-10 * eigenvalues.abs().max()
            self.diagnostics["dropped_eigenvalues"] = int((~keep).sum())
            inv = torch.where(keep, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
            self._solve = lambda b: eigenvectors @ (inv[:, None] * (eigenvectors.T @ b))

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        import torch

        b = vectors.to(torch.float64).T
        return self._solve(b).T


def _extreme_eigenvalues(h, dense_up_to: int = 1000) -> tuple[float | None, float | None]:
    """Smallest and largest eigenvalue of the positive definite ``h``, for the record.

    A full ``eigvalsh`` costs many times the Cholesky factorization on a large ``h`` (and the smallest
    eigenvalue sits in a cluster near the damping, where Lanczos crawls), so above ``dense_up_to``
    parameters only the largest is found (Lanczos); the factorization itself proves the smallest
    positive, and it is recorded as None."""
    import torch

    if len(h) <= dense_up_to:
        eigenvalues = torch.linalg.eigvalsh(h)
        return float(eigenvalues[0]), float(eigenvalues[-1])
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    try:
        return None, float(eigsh(h.cpu().numpy(), k=1, which="LA", tol=1e-8, maxiter=500,
                                 return_eigenvectors=False)[0])
    except ArpackNoConvergence:
        return None, None


@hookimpl
def register_approximators(register):
    register(Exact)
