"""``cg``: conjugate gradients on ``H + damping * I``, many right-hand sides at once.

An influence-store plugin package in one module: the ``influence_store`` entry point in
``pyproject.toml`` names this module, and ``register_approximators`` below hands the host the class.
Every ``influence-store`` command imports this module, so torch is imported only inside the methods
that compute, which keeps ``influence-store --help`` from loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from influence_store.approximators import Approximator
from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.options import option

if TYPE_CHECKING:
    from torch import Tensor

MAX_RECORDED_SOLVES = 1000  # per-call records kept in diagnostics; the totals cover every call


class ConjugateGradient(Approximator):
    """Conjugate gradients on H + damping*I over the full training set, one CG per vector, batched.

    For every right-hand side ``b`` (a row of ``vectors``) it solves ``A x = b`` with
    ``A = H + damping I``, where ``H`` is the mean training-loss Hessian plus the task's ``l2 I``
    (``model.hvp`` over all training examples). From ``x_0 = 0, r_0 = p_0 = b``, each step is

        alpha_j = r_j.r_j / p_j.A p_j        x_{j+1} = x_j + alpha_j p_j
        r_{j+1} = r_j - alpha_j A p_j        p_{j+1} = r_{j+1} + (r_{j+1}.r_{j+1} / r_j.r_j) p_j

    with its own ``alpha`` and ``beta`` per column, so the block is k independent CGs that share each
    HVP call. A column stops once ``|r| <= tol |b|``; the others go on. CG needs ``A`` positive
    definite: ``p.A p <= 0`` is negative curvature, reported with a damping that would remove it.
    Iterates are kept in float64 so the recursion stays accurate for float32 models; the HVPs of such
    a model still round at about 1e-7, which bounds the true residual whatever ``tol`` says. The
    diagnostics therefore report the true residual ``|b - A x| / |b|`` of every call, not CG's own.
    """

    name = "cg"
    working_vectors = 14  # per vector in flight: b, x, r, p, A p in float64, and the HVP's own copies

    @dataclass
    class Options:
        damping: float = option(0.0, "ridge added to the Hessian (a true ridge, like exact's)")
        tol: float = option(1e-6, "stop a column when |residual| <= tol * |right-hand side|")
        max_iter: int = option(1000, "the most CG iterations (full-training-set HVPs) per call")

        def __post_init__(self) -> None:
            if self.damping < 0:
                raise ValueError("damping must be >= 0")
            if not 0 < self.tol < 1:
                raise ValueError("tol must be in (0, 1)")
            if self.max_iter < 1:
                raise ValueError("max_iter must be >= 1")

    @property
    def effective_damping(self) -> float:
        return self.options.damping

    def prepare(self) -> None:
        self.diagnostics.update(solves=[], calls=0, hvps=0, max_iterations=0, max_relative_residual=0.0)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        import torch

        b = vectors.to(self.model.device, torch.float64)
        b_norm = b.norm(dim=1)
        limit = self.options.tol * b_norm
        solution = torch.zeros_like(b)
        # The iterates hold only the columns still running (compacted when some converge), so each
        # step is a few in-place passes over them.
        cols = (b_norm > limit).nonzero().squeeze(1)  # a zero right-hand side is already solved
        x, r = torch.zeros_like(b[cols]), b[cols]
        p, rr = r.clone(), (r * r).sum(1)
        iterations = 0
        while len(cols):
            if iterations == self.options.max_iter:
                self._not_converged(rr.sqrt() / b_norm[cols], len(b))
            iterations += 1
            ap = self._apply(p)
            self.diagnostics["hvps"] += len(cols)
            curvature = torch.einsum("ij,ij->i", p, ap)  # row dot products without a [k, p] temporary
            if (curvature <= 0).any():
                self._negative_curvature(curvature, p, iterations)
            alpha = (rr / curvature)[:, None]
            x.addcmul_(alpha, p)
            r.addcmul_(alpha, ap, value=-1)
            rr_new = torch.einsum("ij,ij->i", r, r)
            p.mul_((rr_new / rr)[:, None]).add_(r)
            rr = rr_new
            done = rr.sqrt() <= limit[cols]
            if done.any():
                solution[cols[done]] = x[done]
                cols, x, r, p, rr = (t[~done] for t in (cols, x, r, p, rr))
        self._record(b, solution, b_norm, iterations)
        return solution

    def _apply(self, p: Tensor) -> Tensor:
        """``(H + damping I) p`` in float64 (the HVP itself runs in the model's dtype)."""
        import torch

        return self.model.hvp(p).to(torch.float64).add_(p, alpha=self.options.damping)

    def _record(self, b: Tensor, x: Tensor, b_norm: Tensor, iterations: int) -> None:
        # The recursive residual drifts from the true one in finite precision: report the true one.
        residual = (b - self._apply(x)).norm(dim=1) / b_norm.clamp_min(1e-300)
        worst = float(residual.max())
        d = self.diagnostics
        d["calls"] += 1
        if len(d["solves"]) < MAX_RECORDED_SOLVES:
            d["solves"].append({"vectors": len(b), "iterations": iterations, "max_relative_residual": worst,
                                "mean_relative_residual": float(residual.mean())})
        d["max_iterations"] = max(d["max_iterations"], iterations)
        d["max_relative_residual"] = max(d["max_relative_residual"], worst)

    def _not_converged(self, relative_residuals: Tensor, vectors: int) -> None:
        o = self.options
        raise InfluenceStoreError(
            f"cg did not converge in max_iter={o.max_iter} iterations for {len(relative_residuals)} of "
            f"{vectors} vectors (worst relative residual {float(relative_residuals.max()):.3g} > "
            f"tol={o.tol:g}); raise -o max_iter, loosen -o tol, "
            f"or add -o damping to improve the conditioning")

    def _negative_curvature(self, curvature: Tensor, p: Tensor, iteration: int) -> None:
        # p.A p / |p|^2 bounds the smallest eigenvalue of A from above, so a ridge of at least
        # damping - that quotient is needed; suggest twice the shortfall.
        quotient = float((curvature / (p * p).sum(1)).min())
        suggestion = self.options.damping + 2 * max(-quotient, 1e-8)
        raise InfluenceStoreError(
            f"cg found negative curvature at iteration {iteration} (p.(H + damping I)p / |p|^2 = "
            f"{quotient:.3g} <= 0): the Hessian is not positive definite here; add damping, e.g. "
            f"-o damping {suggestion:.3g}, or use -a exact")


@hookimpl
def register_approximators(register):
    register(ConjugateGradient)
