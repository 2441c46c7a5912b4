"""Conjugate gradient on many right-hand sides at once, for approximators that refine or solve iteratively.

``curvature(v)`` and ``precondition(r)`` take and return [k, p] float64 rows; both solvers start from zero
and return (x, trace of the largest relative residual after each product, curvature products used, and the
smallest Rayleigh quotient ``p.Ap / |p|^2`` of a direction that met curvature <= 0, else None). That quotient
bounds the curvature's smallest eigenvalue from above: the iterate is then no solution, and a caller should
refuse it (a ridge of at least minus the quotient is needed).
"""

from __future__ import annotations

import torch


def block_pcg(curvature, precondition, b, iters: int, tol: float):
    """Block preconditioned CG (O'Leary 1980) on every row of ``b`` [k, p] at once.

    All rows share one search space: each step's directions are the preconditioned residuals of every row,
    made conjugate to the previous step's, and every row takes its best combination of all of them. The
    few outlying eigenvalues of a network's Hessian (about one per class) are then found once for the
    block instead of once per row: on the digits MLP of docs/ekfac.md, 6 batched products instead of 23.
    The first step is the preconditioner's answer, optimally mixed. The answer depends (within ``tol``) on
    which rows are solved together. Dependent directions are dropped; if the block meets curvature <= 0
    (an indefinite Hessian), it stops there and reports the smallest eigenvalue of the step's curvature
    (its directions are orthonormal, so that is the least Rayleigh quotient over them).
    """
    norms = b.norm(dim=1).clamp_min(1e-300)
    x, r = torch.zeros_like(b), b.clone()
    residual = r.norm(dim=1) / norms
    trace, products, negative = [float(residual.max())], 0, None
    p = q = chol = None  # the last step's directions, their products and its Cholesky factor
    for _ in range(iters):
        active = residual > tol
        if not active.any():
            break
        z = precondition(r[active])  # a solved row needs no new direction
        p = z if p is None else z - torch.cholesky_solve(q @ z.T, chol).T @ p  # conjugate to the last ones
        p = _orthonormal_rows(p)
        if p is None:
            break
        q = curvature(p)
        products += 1
        step = (p @ q.T + q @ p.T) / 2
        chol, not_positive = torch.linalg.cholesky_ex(step)
        if not_positive:
            negative = float(torch.linalg.eigvalsh(step)[0])
            break
        alpha = torch.cholesky_solve(p @ r.T, chol)  # [m, k]
        x = x + alpha.T @ p
        r = r - alpha.T @ q
        residual = r.norm(dim=1) / norms
        trace.append(float(residual.max()))
    return x, trace, products, negative


def _orthonormal_rows(p):
    """Orthonormal rows spanning those of ``p``, without numerically dependent ones; None when none is left.

    Rows are scaled to unit length first: a short row (a test example the model already fits, with a tiny
    gradient) spans a direction as much as a long one, and must not be dropped for being short. A second
    pass restores the orthogonality that the first one's Gram matrix loses."""
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-300)
    for _ in range(2):
        w, v = torch.linalg.eigh(p @ p.T)
        if not w[-1] > 0:
            return None
        keep = w > 1e-12 * w[-1]
        p = (v[:, keep] / w[keep].sqrt()).T @ p
    return p


def pcg(curvature, precondition, b, iters: int, tol: float):
    """Preconditioned CG on each row of ``b`` on its own (rows share each batched product): a row's answer
    does not depend on the other rows.

    A row stops when its residual is below ``tol`` or its direction meets curvature <= 0 (an indefinite
    Hessian); the smallest such direction's Rayleigh quotient is reported.
    """
    norms = b.norm(dim=1).clamp_min(1e-300)
    x, r, products = torch.zeros_like(b), b.clone(), 0
    residual = r.norm(dim=1) / norms
    trace = [float(residual.max())]
    active = residual > tol
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum(1)
    negative = None
    for _ in range(iters):
        if not active.any():
            break
        ap = curvature(p)
        products += 1
        pap = (p * ap).sum(1)
        bad = active & (pap <= 0)
        if bad.any():
            quotient = float((pap / (p * p).sum(1).clamp_min(1e-300))[bad].min())
            negative = quotient if negative is None else min(negative, quotient)
        active &= ~bad
        alpha = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        residual = torch.where(active, r.norm(dim=1) / norms, residual)
        trace.append(float(residual.max()))
        active &= residual > tol
        z = precondition(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / torch.where(rz == 0, torch.ones_like(rz), rz), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    return x, trace, products, negative



def lowest_curvature(curvature, start, steps: int = 50) -> float:
    """The smallest Ritz value of ``curvature`` on the Krylov space of ``start`` [1, p]: Lanczos with full
    reorthogonalization, whose tridiagonal ``T = Q A Q^T`` holds the Ritz values. An upper bound on the smallest
    eigenvalue, tight after a few dozen products when that eigenvalue lies at the spectrum's end (a negative
    one below a mostly positive spectrum)."""
    q = start / start.norm()
    basis, alphas, betas = [q], [], []
    for _ in range(min(steps, start.shape[1])):
        w = curvature(q)
        alphas.append(float((w * q).sum()))
        done = torch.cat(basis)
        for _ in range(2):  # twice: one pass loses orthogonality in finite precision
            w = w - (w @ done.T) @ done
        beta = float(w.norm())
        if not beta > 1e-10 * abs(alphas[-1]) + 1e-300:  # the Krylov space is invariant: T is exact
            break
        betas.append(beta)
        q = w / beta
        basis.append(q)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
    t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(t)[0])
