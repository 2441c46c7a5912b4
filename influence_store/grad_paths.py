"""Per-example gradients: which way they are taken for a model, and why.

Paths, fastest first (``bench_hvp.py``, second table):

- **per-sample hooks** (``per_sample.py``: one batched forward and backward) where every tracked parameter is
  in a linear or embedding layer: 0.63-1.02x the time of ``vmap(grad)``;
- **vmap(grad)** for everything torch.func traces (convolutions: their hooks' unfolded patches cost 1.15-4.6x
  vmap's time);
- **per-sample hooks**, convolutions included, for models vmap cannot trace (``.item()``, boolean masks,
  data-dependent branches);
- **one backward per example**, the last resort.

Hooks are trusted once they matched autograd on the first examples of a first batch; a model whose examples
interact within a batch (batch statistics, a loss centred on the batch) fails that check and moves on. The
choice depends only on the model (and that check), so every process of a run takes the same path. The path
and why are in ``grad_path`` (the run's diagnostics); every change of path is also in ``notes``.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from .errors import InfluenceStoreError
from .train_mode import aligned, grouped_grads


class PerExampleGradients:
    """The per-example gradient paths of ``TrackedModel`` (which provides the model, batches and modes)."""

    def per_example_grads(self, split: str, indices: Sequence[int]) -> Tensor:
        """Gradients of each example's loss, shape [len(indices), p], with gradients enabled whatever
        the caller's grad mode, by the fastest path that serves the model (see the module's docstring)."""
        indices, mode = list(indices), self.mode if split == "train" else "eval"
        if mode == "train" and not aligned(indices, len(self.task.train)):  # masks by position (train_mode.py)
            return grouped_grads(self, indices)
        batch = self.batch(split, indices)
        with torch.enable_grad(), self.model_mode(mode, seed=indices[0] if indices else 0):
            while True:  # every failure moves grad_strategy on: hooks -> vmap -> hooks (as the fallback) -> loop
                if self.grad_strategy.startswith("hooks"):
                    grads = self._trusted_hook_grads(batch, split, indices, mode)
                    if grads is not None:
                        return grads
                elif self.grad_strategy == "vmap":
                    try:
                        return self._vmap_grads(batch)
                    except Exception as exc:  # vmap cannot trace every model (.item(), boolean masks, branches)
                        self._choose_fallback(exc)
                else:
                    return torch.stack([self._single_grad(self.batch(split, [i])) for i in indices])

    def _first_path(self) -> str:
        """Per-sample hooks where they beat ``vmap(grad)``: every tracked parameter in a linear or embedding
        layer (0.63-1.02x vmap's time; convolutions' unfolded patches made hooks up to 4.6x slower)."""
        from .per_sample import FASTER_THAN_VMAP, Unsupported, plan

        self._hooks_are_fallback, self._hooks_refused = False, ""
        try:
            self._hook_plan = plan(self.task.model, self.names, kinds=FASTER_THAN_VMAP)
        except Unsupported:
            self.grad_path.update(path="vmap", why="torch.func traces the model")
            return "vmap"
        self.grad_path.update(path="hooks", why="per-sample hooks are faster than vmap on linear and embedding layers")
        return "hooks?"

    def _trusted_hook_grads(self, batch: Any, split: str, indices: list[int], mode: str) -> Tensor | None:
        """Hook gradients, checked against autograd on the first batch; None (and the next path chosen) when
        the hooks fail or disagree."""
        try:
            grads = self._hook_grads(batch, len(indices))
        except Exception as exc:  # noqa: BLE001 - a layer used in a way the rules do not cover
            self._leave_hooks(f"per-sample hooks failed ({_first_line(exc)})")
            return None
        if self.grad_strategy == "hooks?":
            self._check_hooks(grads, split, indices, mode)
        return grads if self.grad_strategy == "hooks" else None

    def _leave_hooks(self, why: str) -> None:
        if self._hooks_are_fallback:
            self._set_path("loop", f"{self.grad_path['why']}; {why}")
        else:  # the hooks were only the faster path: vmap serves the model (and they are not tried again)
            self._hooks_refused = why
            self._set_path("vmap", why)

    def _choose_fallback(self, exc: Exception) -> None:
        from .per_sample import Unsupported, plan

        why = f"vmap cannot trace the model ({_first_line(exc)})"
        if self._hooks_refused:
            self._set_path("loop", f"{why}; {self._hooks_refused}")
            return
        try:
            self._hook_plan = plan(self.task.model, self.names)
        except Unsupported as reason:
            self._set_path("loop", f"{why}; per-sample hooks do not apply: {reason}")
            return
        self._hooks_are_fallback = True
        self.grad_strategy = "hooks?"  # confirmed against autograd on its first batch
        self.grad_path.update(path="hooks", why=why)  # the same dict the run's diagnostics hold

    def _set_path(self, path: str, why: str) -> None:
        self.grad_strategy = path
        self.grad_path.update(path=path, why=why)
        word = {"loop": "used a per-example loop", "hooks": "used per-sample hooks on the layers",
                "vmap": "used vmap"}[path]
        self.notes.append(f"{why}; {word}")
        if self.verbose:
            print(f"per-example gradients: {why}; {word}", file=sys.stderr)

    def _vmap_grads(self, batch: Any) -> Tensor:
        def loss_of_one(flat: Tensor, example: Any) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            return self._losses(flat, one).sum()

        in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 else None, batch)
        return vmap(grad(loss_of_one), in_dims=(None, in_dims), randomness="different")(self.flat, batch).detach()

    def _hook_grads(self, batch: Any, m: int) -> Tensor:
        from .per_sample import Capture, per_sample_grads

        capture = Capture(self.task.model, self._hook_plan)
        flat = self.flat.detach().requires_grad_(True)  # so every layer output is part of a graph
        with capture.active():
            losses = self._losses(flat, batch)
        if not isinstance(losses, Tensor) or losses.shape != (m,):
            raise InfluenceStoreError("the loss does not return one value per example")
        return per_sample_grads(capture, self._hook_plan, losses, self.names).detach()

    def _check_hooks(self, grads: Tensor, split: str, indices: list[int], mode: str) -> None:
        """Trust the hooks only if they agree with autograd on the first examples (batch norm, say, would
        not). Checked in eval mode: in train mode a batch and an example draw different dropout masks."""
        if mode != "eval":
            with self.model_mode("eval"):
                grads = self._hook_grads(self.batch(split, indices), len(indices))
        for row, i in list(enumerate(indices))[:2]:
            with self.model_mode("eval"):
                expected = self._single_grad(self.batch(split, [i]))
            error = float((grads[row] - expected).norm()) / max(float(expected.norm()), 1e-30)
            if error > 1e-4:
                self._leave_hooks(f"per-sample hooks disagreed with autograd (relative error {error:.1e}: examples "
                                  f"interact within a batch, or a layer is shared or sees the batch elsewhere)")
                return
        if self._hooks_are_fallback:
            self._set_path("hooks", self.grad_path["why"])
        else:
            self.grad_strategy = "hooks"

    def _single_grad(self, batch: Any) -> Tensor:
        flat = self.flat.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._losses(flat, batch).sum()
            (g,) = torch.autograd.grad(loss, flat, allow_unused=True)
        return torch.zeros_like(flat) if g is None else g.detach()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"
