"""``lissa``: AllenNLP SimpleInfluence's stochastic inverse-HVP, vectorized over many vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from influence_store.approximators import Approximator
from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.options import option

if TYPE_CHECKING:  # torch is imported where it runs, so listing plugins stays fast
    import torch

DEFAULT_DEPTH_FRACTION = 0.25


class LiSSA(Approximator):
    """LiSSA (Agarwal et al. 2017) with AllenNLP's parameters and defaults.

    Starting from ``h_0 = v``, each step draws a training batch B and sets
    ``h_j = v + (1 - damping) h_{j-1} - H_B h_{j-1} / scale``; the estimate is ``h_J / scale``,
    averaged over ``num_samples`` runs. Its fixed point is ``(H + damping * scale * I)^-1 v``, so the
    effective ridge is ``damping * scale`` (30 with the defaults: at the default depth the result is
    close to a scaled gradient, as in AllenNLP). ``scale`` must exceed the largest Hessian eigenvalue.

    ``scale="auto"`` estimates that eigenvalue by power iteration and sets ``scale = scale_margin *
    lambda_max``; unless a depth is given it then iterates until the mean of successive windows of
    iterates changes by less than ``tol`` (relative), returning that window mean, so with
    ``damping=0`` it converges to ``H^-1 v``. The batch sequence comes from a generator seeded with
    the run's seed and restarted for every call, so a vector's estimate does not depend on which other
    vectors share the call or in which order test points are processed.
    """

    name = "lissa"
    working_vectors = 6  # per vector in flight: v, the iterate, the HVP, the next iterate, the sum, slack

    @dataclass
    class Options:
        batch_size: int = option(8, "training examples per Hessian-vector product (AllenNLP lissa_batch_size)")
        damping: float = option(3e-3, "damping of the recursion; the effective ridge is damping * scale")
        num_samples: int = option(1, "independent recursions averaged together")
        scale: float | str = option(1e4, "divides the Hessian; must exceed its top eigenvalue, or 'auto'")
        depth_fraction: float | None = option(
            None, "steps = int(fraction * ceil(n / batch_size)), AllenNLP's float recursion_depth (at least 1); "
            "0.25 unless scale=auto")
        depth_iters: int | None = option(None, "steps as an absolute number (overrides depth_fraction)")
        tol: float = option(1e-2, "scale=auto without depth: stop when successive window means change less than this")
        max_iters: int = option(20000, "scale=auto without depth: the most steps per sample")
        scale_margin: float = option(1.5, "scale=auto: scale = margin * estimated top eigenvalue")

        def __post_init__(self) -> None:
            if isinstance(self.scale, str) and self.scale != "auto":
                raise ValueError(f"scale must be a positive number or 'auto', got {self.scale!r}")
            if not isinstance(self.scale, str) and not self.scale > 0:
                raise ValueError("scale must be > 0")
            if self.batch_size < 1 or self.num_samples < 1:
                raise ValueError("batch_size and num_samples must be >= 1")
            if not 0 <= self.damping < 1:
                raise ValueError("damping must be in [0, 1)")
            if self.depth_fraction is not None and not self.depth_fraction > 0:
                raise ValueError("depth_fraction must be > 0")
            if self.depth_iters is not None and self.depth_iters < 1:
                raise ValueError("depth_iters must be >= 1")
            if self.depth_iters is not None and self.depth_fraction is not None:
                raise ValueError("give depth_fraction or depth_iters, not both")
            if self.scale_margin <= 1:
                raise ValueError("scale_margin must be > 1")

    def prepare(self) -> None:
        o = self.options
        if o.scale == "auto":
            top = self._top_eigenvalue()
            self.scale = o.scale_margin * top
            self.diagnostics["top_eigenvalue"] = top
        else:
            self.scale = float(o.scale)
        self.steps = self._steps()
        self.diagnostics.update(scale=self.scale, steps=self.steps or "until converged",
                                effective_damping=self.effective_damping)

    @property
    def effective_damping(self) -> float:
        scale = getattr(self, "scale", self.options.scale)
        return self.options.damping * scale if not isinstance(scale, str) else float("nan")

    def _steps(self) -> int | None:
        """AllenNLP's count for a float ``recursion_depth``: ``int(batches per epoch * fraction)``, so the
        defaults run exactly SimpleInfluence's steps; where that is 0 (AllenNLP would run none), 1 step."""
        o = self.options
        if o.depth_iters is not None:
            return o.depth_iters
        if o.depth_fraction is None and o.scale == "auto":
            return None
        fraction = DEFAULT_DEPTH_FRACTION if o.depth_fraction is None else o.depth_fraction
        batches = self.model.num_batches(o.batch_size)
        steps = int(batches * fraction)
        if steps < 1:
            self.diagnostics["depth_note"] = (
                f"int({batches} batches x {fraction:g}) = 0 steps (AllenNLP would run none and return the "
                f"unchanged vectors / scale); ran 1 step")
            return 1
        return steps

    def _top_eigenvalue(self, iterations: int = 50) -> float:
        """Power iteration on the full training Hessian; stops once the estimate settles."""
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        v = torch.randn(1, self.model.num_params, generator=generator, dtype=torch.float64)
        v = (v / v.norm()).to(self.model.dtype)
        estimate = 0.0
        for _ in range(iterations):
            hv = self.model.hvp(v)
            new = float((hv * v).sum())
            v = hv / hv.norm().clamp_min(1e-30)
            if abs(new - estimate) <= 1e-4 * abs(new):
                estimate = new
                break
            estimate = new
        if not estimate > 0:
            raise InfluenceStoreError(
                "scale=auto found no positive Hessian eigenvalue; the loss may be flat or non-convex here: "
                "give {scale_number}", scale_number='options={"scale": NUMBER}')
        return abs(estimate)

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        import torch

        o = self.options
        v = vectors.to(self.model.device, self.model.dtype)
        stream = self.model.batch_stream(o.batch_size, torch.Generator().manual_seed(self.seed))
        recursion = self._fixed_depth if self.steps is not None else self._until_settled
        total = torch.zeros_like(v)
        for _ in range(o.num_samples):
            total += recursion(v, stream) / self.scale
        return total / o.num_samples

    def _fixed_depth(self, v: torch.Tensor, stream) -> torch.Tensor:
        v_norm = v.norm(dim=1).clamp_min(1e-30)
        h = v
        for step in range(1, self.steps + 1):
            h = self._step(h, v, v_norm, next(stream), step, self.steps)
        self.diagnostics["steps_run"] = self.steps
        return h

    def _until_settled(self, v: torch.Tensor, stream) -> torch.Tensor:
        """Iterate until each row's window mean settles, and return those means.

        Windows end at steps W, 2W, 4W, ... (a window doubles while its mean still moves, which
        averages out the batch noise once the bias has decayed). A row stops at the first boundary
        where its own mean changed by less than ``tol``, so its estimate depends only on its own
        iterates, never on which other vectors share the call.
        """
        import torch

        o = self.options
        result = torch.empty_like(v)
        rows = torch.arange(len(v), device=v.device)
        v_norm = v.norm(dim=1).clamp_min(1e-30)
        h, window_sum, previous = v, torch.zeros_like(v), None
        window_start, boundary = 0, max(10, self.model.num_batches(o.batch_size))
        changes = self.diagnostics.setdefault("window_changes", [])
        for step in range(1, o.max_iters + 1):
            h = self._step(h, v, v_norm, next(stream), step, o.max_iters)
            window_sum += h
            if step < boundary:
                continue
            mean = window_sum / (step - window_start)
            if previous is not None:
                change = (mean - previous).norm(dim=1) / mean.norm(dim=1).clamp_min(1e-30)
                if len(changes) < 1000:
                    changes.append([step, float(change.max())])
                done = change < o.tol
                result[rows[done]] = mean[done]
                if done.all():
                    self._record_depth(step, converged=True)
                    return result
                keep = ~done
                rows, v, v_norm, h, mean = rows[keep], v[keep], v_norm[keep], h[keep], mean[keep]
            previous, window_sum = mean, torch.zeros_like(h)
            window_start, boundary = step, 2 * step
        result[rows] = previous if previous is not None else h
        self._record_depth(o.max_iters, converged=False)
        return result

    def _step(self, h, v, v_norm, batch, step: int, limit: int) -> torch.Tensor:
        """``h <- v + (1 - damping) h - H_batch h / scale``, stopping on divergence.

        Norms are taken on the first ten steps, every tenth and the last (a diverging recursion grows
        geometrically, so it is caught within ten steps), not on every step: each check is a few small
        kernels and a synchronization, a noticeable share of a step on small models."""
        import torch

        h = self.model.hvp(h, batch).mul_(-1 / self.scale).add_(h, alpha=1 - self.options.damping).add_(v)
        traced = step <= 10 or step % max(10, limit // 100) == 0 or step == limit
        if not (traced or step % 10 == 0):
            return h
        norms = h.norm(dim=1)
        # Every iterate of a convergent recursion has norm <= (step + 1) |v|; far above that it diverges.
        if not torch.isfinite(norms).all() or (norms > 10 * (step + 1) * v_norm).any():
            larger, more = 10 * self.scale, max(10 * self.options.damping, 1e-3)
            if self.options.scale == "auto":  # the top eigenvalue was estimated: suspect negative curvature
                raise InfluenceStoreError(
                    "LiSSA diverged at step {step} (estimate norm {norm:.3g}) with scale auto ({scale:g}): the "
                    "Hessian likely has negative curvature (LiSSA needs H + damping*scale positive definite) or "
                    "batch Hessians above the estimate; add damping (e.g. {more_damping}) or set a larger scale "
                    "(e.g. {larger_scale})", step=step, norm=float(norms.max()), scale=self.scale, larger=larger,
                    damping=more, more_damping=f'options={{"damping": {more:.3g}}}',
                    larger_scale=f'options={{"scale": {larger:g}}}')
            raise InfluenceStoreError(
                "LiSSA diverged at step {step} (estimate norm {norm:.3g}); the Hessian's top eigenvalue exceeds "
                "scale={scale:g}: use a larger scale (e.g. {larger_scale}) or {auto_scale}", step=step,
                norm=float(norms.max()), scale=self.scale, larger=larger,
                larger_scale=f'options={{"scale": {larger:g}}}', auto_scale='options={"scale": "auto"}')
        trace = self.diagnostics.setdefault("norm_trace", [])
        if traced and len(trace) < 1000:
            trace.append([step, float((norms / v_norm).mean()) / self.scale])
        return h

    def _record_depth(self, steps: int, converged: bool) -> None:
        """Across calls: the most steps any call ran, and whether every call converged."""
        self.diagnostics["steps_run"] = max(steps, self.diagnostics.get("steps_run", 0))
        self.diagnostics["converged"] = converged and self.diagnostics.get("converged", True)


@hookimpl
def register_approximators(register):
    register(LiSSA)
