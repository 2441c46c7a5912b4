"""``ekfac``: eigenvalue-corrected Kronecker-factored curvature, for models far past ``exact``'s limit.

For a tracked layer with input rows ``a`` and output-gradient rows ``ds`` (see ``influence_store.layers``),
K-FAC approximates the layer's block of the Fisher / Gauss-Newton matrix ``F`` by ``A (x) S`` with

    A = mean over rows of a a^T,    S = mean over rows of ds ds^T      (float64 sums of per-batch products)

(a row is an example for a plain Linear layer, an example x position for a convolution). With the
eigendecompositions ``A = Q_A diag(l_A) Q_A^T`` and ``S = Q_S diag(l_S) Q_S^T``, K-FAC's eigenvalues in the
basis ``Q_S (x) Q_A`` are ``l_S l_A^T``; EK-FAC (George et al. 2018; Grosse et al. 2023) replaces them by
the true second moments of the per-example gradients ``G_i = sum_t ds_it a_it^T`` in that basis,

    Lambda = mean_i (Q_S^T G_i Q_A)^2      (elementwise),

and the inverse-HVP of a layer block ``V`` [out, in] is

    Q_S [(Q_S^T V Q_A) / (Lambda + l2 + damping)] Q_A^T.

Every other tracked parameter gets a diagonal block: the mean squared per-example gradient (the empirical
Fisher's diagonal), recorded in the diagnostics. ``damping`` is a true ridge on the mean-loss curvature (as
in ``exact``), and the task's ``l2`` is added to it, so the solve approximates ``(H + l2 + damping)^-1 v``.

``refine_iters > 0`` then runs preconditioned conjugate gradient on the model's true Hessian (or its
Gauss-Newton matrix) with the EK-FAC inverse as preconditioner, for all test vectors at once (its first step
is the EK-FAC answer); the residual trace goes to the diagnostics, and negative curvature is an error.

The fitted factors are the approximator's ``state()``, stored with the run so a resumed run reuses them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from influence_store.approximators import Approximator
from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.options import option

STATE_VERSION = 1
MAX_TRACED_CALLS = 20  # refinement calls whose residual traces are kept in the diagnostics
# From this many vectors a block finds the Hessian's outlying eigenvalues faster without the factors than with
# them (from about 10 on a tanh and a ReLU MLP, docs/ekfac.md; not yet at 8 on a 310-parameter MLP); a smaller
# block, or one vector, does better preconditioned.
PLAIN_BLOCK = 32


class EKFAC(Approximator):
    """EK-FAC (or K-FAC): Kronecker-factored curvature per layer; optional CG refinement on the true Hessian."""

    name = "ekfac"

    @property
    def working_vectors(self) -> int:
        """p-vectors in the model's precision per test vector in flight (the plan counts them): its
        gradient, a float64 result (2 for float32), one layer's rotated copies (up to 3 when one layer
        holds most parameters); refinement holds b, x, r, z, p, Ap in float64 and the HVP's own copies."""
        per_f64 = 8 // self.model.itemsize
        return 1 + 2 * per_f64 + 3 + (7 * per_f64 + 3 if self.options.refine_iters else 0)

    @dataclass
    class Options:
        damping: float = option(0.0, "ridge added to the curvature (a true ridge, not scaled), plus the task's l2")
        strategy: str = option("ekfac", "ekfac (eigenvalue-corrected) or kfac (Kronecker eigenvalues)")
        fisher: str = option("true", "true (the model's own predictive distribution, sampled, seeded), "
                                     "empirical (the examples' own labels) or gauss-newton (exact, one pass "
                                     "per model output)")
        samples: int = option(1, "draws per example for the true Fisher")
        batch_size: int = option(64, "training examples per forward pass while fitting the factors")
        refine_iters: int = option(0, "preconditioned CG iterations on the true curvature (0: plain EK-FAC)")
        refine_tol: float = option(1e-6, "stop refining when every relative residual is below this")
        refine_curvature: str = option("hessian", "hessian or gauss-newton: the curvature refinement solves with")
        refine_method: str = option("block", "block (one search space for all test vectors: fewer products, an "
                                             "answer that depends within refine_tol on which vectors share it) "
                                             "or vector (one CG per test vector)")
        refine_preconditioner: str = option("auto", "ekfac (the fitted factors), none, or auto: none for a "
                                                    f"block of at least {PLAIN_BLOCK} vectors (measured: never "
                                                    "worse there, often far better), ekfac otherwise")

        def __post_init__(self) -> None:
            from influence_store.layers import FISHER_TYPES

            if self.damping < 0:
                raise ValueError("damping must be >= 0")
            if self.strategy not in ("ekfac", "kfac"):
                raise ValueError("strategy must be ekfac or kfac")
            if self.fisher not in FISHER_TYPES:
                raise ValueError(f"fisher must be one of {', '.join(FISHER_TYPES)}")
            if self.samples < 1 or self.batch_size < 1:
                raise ValueError("samples and batch_size must be >= 1")
            if self.refine_iters < 0 or self.refine_tol < 0:
                raise ValueError("refine_iters and refine_tol must be >= 0")
            if self.refine_curvature not in ("hessian", "gauss-newton"):
                raise ValueError("refine_curvature must be hessian or gauss-newton")
            if self.refine_method not in ("block", "vector"):
                raise ValueError("refine_method must be block or vector")
            if self.refine_preconditioner not in ("auto", "ekfac", "none"):
                raise ValueError("refine_preconditioner must be auto, ekfac or none")

    _factors: dict | None = None
    _view_exact: bool | None = None  # the layer view's gradients are the model's (checked once)

    @property
    def effective_damping(self) -> float:
        return self.options.damping

    @property
    def ridge(self) -> float:
        return self.options.damping + self.model.l2

    # ---------- fitting ----------
    def prepare(self) -> None:
        import time

        from influence_store.layers import LayerView, describe

        self.view = LayerView(self.model)
        self.diagnostics.update(describe(self.view), strategy=self.options.strategy, fisher=self.options.fisher)
        if self.view.diagonal_names:
            self.diagnostics["diagonal_fisher"] = "empirical (mean squared per-example gradient)"
        started = time.perf_counter()
        if self._factors is None:
            self._factors = fit_factors(self.view, self.options, self.seed)
            self.diagnostics["factors"] = "fitted"
        else:
            self._check_state()
            self.diagnostics["factors"] = "reused"
        self.diagnostics["seconds_factors"] = time.perf_counter() - started
        self._invert()

    def _invert(self) -> None:
        import torch

        ridge = self.ridge
        eigs = [layer["eigenvalues"] for layer in self._factors["layers"]] + [self._factors["diagonal"]]
        largest = max([float(e.max()) for e in eigs if e.numel()] + [0.0]) + ridge
        self._inverse_eigenvalues, dropped = [], 0
        for e in eigs:
            den = e + ridge
            keep = den > 1e-12 * largest
            dropped += int((~keep).sum())
            self._inverse_eigenvalues.append(torch.where(keep, 1.0 / den.clamp_min(1e-300), torch.zeros_like(den)))
        self.diagnostics["dropped_eigenvalues"] = dropped
        # Rotations in the model's precision (fitted in float64): float32 GEMMs are twice as fast, and a
        # float32 model's gradients carry no more digits than that.
        dtype = self.model.dtype
        self._rotations = [(None if layer["qa"] is None else _flush(layer["qa"].to(dtype).contiguous()),
                            _flush(layer["qs"].to(dtype).contiguous()), inverse.to(dtype))
                           for layer, inverse in zip(self._factors["layers"], self._inverse_eigenvalues)]

    # ---------- state stored with the run ----------
    def state(self) -> bytes:
        """The fitted factors (the costly part), for the store."""
        import torch

        buffer = io.BytesIO()
        torch.save({"version": STATE_VERSION, "key": self._state_key(), **self._factors}, buffer)
        return buffer.getvalue()

    def load_state(self, data: bytes) -> None:
        """Reuse factors fitted earlier for the same model, tracked parameters and options."""
        import torch

        state = torch.load(io.BytesIO(data), map_location=self.model.device, weights_only=True)
        if state.get("version") != STATE_VERSION or state.get("key") != self._state_key():
            return  # fitted for something else: fit again
        self._factors = {"layers": state["layers"], "diagonal": state["diagonal"]}

    def _state_key(self) -> list:
        o = self.options
        return [list(self.model.names), o.strategy, o.fisher, o.samples, o.batch_size, self.seed]

    def _check_state(self) -> None:
        shapes = [(layer.out_dim, layer.in_dim) for layer in self.view.layers]
        stored = [tuple(layer["eigenvalues"].shape) for layer in self._factors["layers"]]
        if shapes != stored:
            raise InfluenceStoreError("stored EK-FAC factors do not match the model's layers; start a new run")

    # ---------- solving ----------
    def precondition(self, vectors):
        """The EK-FAC inverse applied to every row of ``vectors`` [k, p], float64.

        One layer at a time, straight into the result: beside the input and the float64 result, only one
        layer's block is held in a few copies (the plan counts ``working_vectors``)."""
        import torch

        v = vectors.to(self.model.device)
        f64, dtype = torch.float64, self.model.dtype
        result = torch.empty(v.shape, dtype=f64, device=v.device)
        # each vector near 1 by a power of two (exactly undone at the end), so no product is subnormal
        scale = _power_of_two_scale(v.abs().amax(dim=1, keepdim=True).to(f64))  # [k, 1]
        for layer, (qa, qs, inv) in zip(self.view.layers, self._rotations):
            m = self.view.matrix(v, layer)
            m = _flush((m / scale[:, :, None].to(m.dtype)).to(dtype))
            r = _flush(qs.T @ m)
            r = _flush(r @ qa) if qa is not None else r
            r = _flush(qs @ _flush(r * inv))
            self.view.set_matrix(layer, r @ qa.T if qa is not None else r, result)
        result.mul_(scale)
        if self.view.diagonal_names:
            self.view.set_diagonal(self.view.diagonal(v).to(f64) * self._inverse_eigenvalues[-1], result)
        return result

    def self_influence(self, indices):
        """``g_i^T P g_i`` (P the EK-FAC inverse) from each layer's inputs ``a`` and output gradients ``ds``:
        ``g_i^T P g_i = sum (Q_S^T G_i Q_A)^2 * inverse eigenvalues``, one rotation of each example's
        gradient instead of the two (and the flat gradient) that ``inverse_hvp`` takes; for a Linear layer
        (one position) not even the gradient matrix is formed. None with refinement, whose inverse has no
        such form, or where the layer view does not give the model's gradients (``_layer_view_is_exact``)."""
        import torch

        if self.options.refine_iters or not self._layer_view_is_exact():
            return None
        tm, f64 = self.model, torch.float64
        out = []
        for start in range(0, len(indices), self.options.batch_size):
            chunk = indices[start:start + self.options.batch_size]
            total = torch.zeros(len(chunk), dtype=f64, device=tm.device)
            (captured,) = self.view.captures(chunk, "empirical")
            for layer, (qa, qs, inv), (a, ds) in zip(self.view.layers, self._rotations, captured):
                total += _rotated_square_sum(layer, qa, qs, inv, a, ds, tm.memory_budget)
            if self.view.diagonal_names:
                grads = self.view.diagonal_model().per_example_grads("train", chunk).to(f64)
                total += (grads * grads * self._inverse_eigenvalues[-1]).sum(1)
            out.append(total)
        return torch.cat(out)

    def training_dot_products(self):
        """Scores from each layer's inputs and output gradients (``LayerView.dot_gradients``), never the flat
        per-example gradients: on the 1M-parameter CNN those cost 4-6 ms per example to form and copy.
        None where the layer view does not give the model's gradients (``_layer_view_is_exact``)."""
        return self.view.dot_gradients if self._layer_view_is_exact() else None

    def _layer_view_is_exact(self) -> bool:
        """Whether the layer view's gradients are the model's: not in train mode (the view runs in eval
        mode), and checked once on two training examples against the flat gradients, which catches a
        parameter used outside its own layer (tied weights) that the hooks cannot see. The factors are an
        approximation either way; scores and self-influence then take the flat gradients."""
        if self._view_exact is None:
            if self.model.mode != "eval":
                self._view_exact, verdict = False, "not used: training gradients in train mode"
            elif self.view.reproduces_gradients():
                self._view_exact, verdict = True, "exact"
            else:
                self._view_exact, verdict = False, "not used: they differ from the model's (a parameter used " \
                                                   "outside its layer?)"
            self.diagnostics["layer_view_gradients"] = verdict
        return self._view_exact

    def inverse_hvp(self, vectors):
        """In the model's precision, like the training gradients it is multiplied with: a float64 result
        would turn every score GEMM into a float64 one (half the speed) on a float32 model."""
        x = self._refine(vectors) if self.options.refine_iters else self.precondition(vectors)
        return x.to(self.model.dtype)

    def _refine(self, b):
        import torch

        from influence_store.layers import gauss_newton_product
        from influence_store.solvers import block_pcg, lowest_curvature, pcg

        damping = self.options.damping
        if self.options.refine_curvature == "hessian":
            def curvature(v):
                return self.model.hvp(v).to(torch.float64) + damping * v
        else:
            def curvature(v):
                return gauss_newton_product(self.view, v, self.options.batch_size).to(torch.float64) + damping * v

        solve = block_pcg if self.options.refine_method == "block" else pcg
        preconditioner = self.options.refine_preconditioner
        if preconditioner == "auto":
            plain = self.options.refine_method == "block" and len(b) >= PLAIN_BLOCK
            preconditioner = "none" if plain else "ekfac"
        precondition = self.precondition if preconditioner == "ekfac" else lambda r: r
        x, trace, products, negative = solve(curvature, precondition, b.to(torch.float64),
                                             self.options.refine_iters, self.options.refine_tol)
        if negative is not None:  # CG's iterate on an indefinite matrix is no inverse: refuse, as cg does
            start = torch.randn(b[:1].shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
            lowest = min(negative, lowest_curvature(curvature, start.to(b.device)))  # a bound from above
            more = damping + 2 * max(-lowest, 1e-8)
            raise InfluenceStoreError(
                "EK-FAC refinement met negative curvature (H + damping I has an eigenvalue <= {lowest:.3g}): the "
                "Hessian is not positive definite here; add damping, e.g. {more_damping}, or use {approximator_exact}",
                lowest=lowest, damping=more, more_damping=f'options={{"damping": {more:.3g}}}',
                approximator_exact='approximator="exact"')
        d = self.diagnostics
        d["refine_calls"] = d.get("refine_calls", 0) + 1
        d["refine_curvature_products"] = d.get("refine_curvature_products", 0) + products
        d["refine_final_residual_max"] = max(d.get("refine_final_residual_max", 0.0), trace[-1])
        d["refine_preconditioners_used"] = sorted({*d.get("refine_preconditioners_used", []), preconditioner})
        if d["refine_calls"] <= MAX_TRACED_CALLS:
            d.setdefault("refine_residual_traces", []).append(trace)
        return x


def _rotated_square_sum(layer, qa, qs, inv, a, ds, budget_bytes: int, order: str | None = None):
    """Per example ``sum (Q_S^T G_i Q_A)^2 * inv`` of one layer [B], float64."""
    import torch

    # each example's rows scaled near 1 by powers of two (undone exactly at the end), and the rotations'
    # tiny entries flushed: products of tiny numbers are subnormal, and subnormal arithmetic is slow
    ds_scale = _power_of_two_scale(ds.to(torch.float64).flatten(1))
    ds = _flush((ds / ds_scale[:, :, None].to(ds)).to(qs.dtype))
    scale = ds_scale[:, 0] ** 2
    if layer.kind != "embedding":
        a_scale = _power_of_two_scale(a.to(torch.float64).flatten(1))
        a = _flush((a / a_scale[:, :, None].to(a)).to(qs.dtype))
        scale = scale * a_scale[:, 0] ** 2
    if layer.kind != "embedding" and ds.shape[1] == 1:  # G_i = ds_i a_i^T: (Q_S^T ds_i)^2 inv (Q_A^T a_i)^2
        u, w = _flush(ds[:, 0] @ qs), _flush(a[:, 0] @ qa)
        return torch.einsum("bo,oi,bi->b", u * u, inv, w * w).to(torch.float64) * scale
    return torch.cat([(r * r * inv).sum((1, 2)) for r in _rotated_gradients(layer, qa, qs, a, ds, budget_bytes, order)]
                     ).to(torch.float64) * scale


def _power_of_two_scale(rows):
    """Per row of ``rows`` [k, d] (float64) the power of two nearest below its largest magnitude (1 for a zero
    row), as [k, 1]: dividing by it is exact and brings every row near 1."""
    import torch

    largest = rows.abs().amax(dim=1, keepdim=True)
    return torch.where(largest > 0, torch.exp2(torch.floor(torch.log2(largest.clamp_min(1e-300)))),
                       torch.ones_like(largest))


def _flush(x):
    """``x`` with entries below the square root of its type's smallest normal number set to zero: the
    product of two remaining entries is then never subnormal (subnormal arithmetic is many times slower),
    and what is dropped lies far below the type's precision for values near 1."""
    import torch

    return x.masked_fill(x.abs() < torch.finfo(x.dtype).tiny ** 0.5, 0)


def _rotated_gradients(layer, qa, qs, a, ds, budget_bytes: int, order: str | None = None):
    """``Q_S^T G_i Q_A`` [b, out, in] for the examples of a batch, a few at a time (the memory budget), the
    cheaper way round (``order``, when not given): rotate the rows (``a Q_A``, ``ds Q_S``) or each
    example's summed gradient ``G_i = sum_t ds_it a_it^T``."""
    import torch

    if layer.kind == "embedding":  # one-hot inputs: the basis of A is the identity
        yield qs.T @ layer.per_example_grads(a, ds)
        return
    positions, out_dim, in_dim = ds.shape[1], layer.out_dim, layer.in_dim
    if order is None:
        by_rows = positions * (out_dim * out_dim + in_dim * in_dim + out_dim * in_dim)
        by_gradient = positions * out_dim * in_dim + out_dim * in_dim * (out_dim + in_dim)
        order = "rows" if by_rows < by_gradient else "gradient"
    step = max(1, budget_bytes // (3 * a.element_size() * out_dim * in_dim))
    for s in range(0, len(a), step):
        if order == "rows":
            yield torch.einsum("bto,bti->boi", _flush(ds[s:s + step] @ qs), _flush(a[s:s + step] @ qa))
        else:
            yield _flush(qs.T @ _flush(torch.einsum("bto,bti->boi", ds[s:s + step], a[s:s + step]))) @ qa


def fit_factors(view, options, seed: int) -> dict:
    """Covariances, their eigendecompositions, then (for ekfac) the eigenvalue-correction pass."""
    import torch

    from influence_store.layers import batches

    tm = view.model
    n = len(tm.task.train)
    f64 = torch.float64
    dev = tm.device
    generator = torch.Generator().manual_seed(seed)
    cov_a = [torch.zeros(layer.in_dim, dtype=f64, device=dev) if layer.kind == "embedding"
             else torch.zeros(layer.in_dim, layer.in_dim, dtype=f64, device=dev) for layer in view.layers]
    cov_s = [torch.zeros(layer.out_dim, layer.out_dim, dtype=f64, device=dev) for layer in view.layers]
    rows = [0] * len(view.layers)
    for idx in batches(n, options.batch_size):
        for column, captured in enumerate(view.captures(idx, options.fisher, generator, options.samples)):
            for i, (layer, (a, ds)) in enumerate(zip(view.layers, captured)):
                # each batch's product in the model's precision, accumulated in float64
                ds = ds.reshape(-1, ds.shape[-1])
                cov_s[i] += (ds.T @ ds).to(f64)
                if column:
                    continue  # the inputs are the same for every backward pass of a batch
                if layer.kind == "embedding":
                    ids = a.reshape(-1)
                    if layer.module.padding_idx is not None:
                        ids = ids[ids != layer.module.padding_idx]
                    cov_a[i] += torch.bincount(ids, minlength=layer.in_dim).to(f64)
                else:
                    a = a.reshape(-1, a.shape[-1])
                    cov_a[i] += (a.T @ a).to(f64)
                rows[i] += ds.shape[0]
    layers = []
    for layer, a, s, count in zip(view.layers, cov_a, cov_s, rows):
        a, s = a / max(count, 1), s / max(count, 1)
        ls, qs = torch.linalg.eigh((s + s.T) / 2)
        if layer.kind == "embedding":  # one-hot inputs: A is diagonal, its eigenbasis the identity
            la, qa = a, None
        else:
            la, qa = torch.linalg.eigh((a + a.T) / 2)
        layers.append({"qa": qa, "qs": qs, "eigenvalues": torch.outer(ls.clamp_min(0), la.clamp_min(0))})
    if options.strategy == "ekfac":
        _correct_eigenvalues(view, options, layers, generator)
    return {"layers": layers, "diagonal": _diagonal_fisher(view, options)}


def _correct_eigenvalues(view, options, layers, generator) -> None:
    """``Lambda = mean_i (Q_S^T G_i Q_A)^2`` from a second pass (fresh draws for the true Fisher)."""
    import torch

    from influence_store.layers import batches

    tm = view.model
    n = len(tm.task.train)
    sums = [torch.zeros_like(layer["eigenvalues"]) for layer in layers]
    for idx in batches(n, options.batch_size):
        for captured in view.captures(idx, options.fisher, generator, options.samples):
            for i, (layer, factors, (a, ds)) in enumerate(zip(view.layers, layers, captured)):
                qa, qs, ds = factors["qa"], factors["qs"], ds.to(torch.float64)
                if layer.kind != "embedding":
                    a = a.to(torch.float64)
                if layer.kind != "embedding" and ds.shape[1] == 1:  # G_i = ds_i a_i^T: sum_i of its squares
                    u, w = ds[:, 0] @ qs, a[:, 0] @ qa
                    sums[i] += (u * u).T @ (w * w)
                    continue
                for rotated in _rotated_gradients(layer, qa, qs, a, ds, tm.memory_budget):
                    sums[i] += (rotated * rotated).sum(0)
    for factors, total in zip(layers, sums):
        factors["eigenvalues"] = total / n


def _diagonal_fisher(view, options):
    """Mean squared per-example gradient of the parameters outside the tracked layers."""
    import torch

    tm = view.model
    if not view.diagonal_names:
        return torch.zeros(0, dtype=torch.float64, device=tm.device)
    sub = view.diagonal_model()
    total = torch.zeros(sub.num_params, dtype=torch.float64, device=tm.device)
    with torch.no_grad():
        for _, g in sub.grad_chunks("train"):
            total += (g.to(torch.float64) ** 2).sum(0)
    tm.notes.extend(sub.notes)
    return total / len(tm.task.train)


@hookimpl
def register_approximators(register):
    register(EKFAC)
