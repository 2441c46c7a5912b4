"""Training scores of a few test vectors by forward-mode directional derivatives.

``v . g_i`` is the derivative of training example i's loss along ``v``: one forward-mode pass over a batch
gives it for every example in the batch. Scoring k inverse-HVP vectors this way costs about k forward
passes and needs no per-example gradients, which cost p floats per example to write and to read again
(575 MB for 1,437 examples of a 100k-parameter MLP). For a few vectors on a model whose forward pass is
cheap next to its parameter count (MLPs, embeddings) that is several times faster; for many vectors, or a
convolutional net whose forward pass reuses each weight many times, the gradients are faster. The choice
(``directional_pays``) depends only on the model and the number of test vectors, so a run's scores are
the same bits in any process; it is made only when nothing else needs the per-example gradients (no
self-influence, eval mode, no approximator with its own training pass).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .errors import InfluenceStoreError
from .gradients import CPU_PIECE_BYTES, TrackedModel

MAX_VECTORS = 16  # test vectors at most: each one is a forward-mode pass over the training set
FLOPS_PER_PARAM = 32  # k x (forward flops per example) at most this x p (about 3x below break-even on MLPs)
CHECK_EXAMPLES = 2  # compared with their per-example gradients once: batched examples must not interact


def forward_flops(model: TrackedModel) -> int | None:
    """Matrix-multiply and convolution flops of one training example's loss (None: not countable)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), model.eval_mode(), FlopCounterMode(display=False) as counter:
            model._losses(model.flat, model.batch("train", [0]))
        return counter.get_total_flops()
    except Exception:  # noqa: BLE001 - an op the counter cannot see through: keep the gradients
        return None


def directional_pays(model: TrackedModel, num_vectors: int) -> bool:
    """Whether k directional passes cost clearly less than one pass of flat per-example gradients."""
    if not 0 < num_vectors <= MAX_VECTORS or model.mode != "eval" or len(model.task.train) == 0:
        return False
    flops = forward_flops(model)
    return flops is not None and num_vectors * flops <= FLOPS_PER_PARAM * model.num_params


class DirectionalDots:
    """``(vectors [k, p], train indices) -> vectors @ g_i`` [k, len(indices)] as float64, like an approximator's
    ``training_dot_products``, or None once forward mode has failed or the batched derivatives disagreed
    with per-example gradients (examples that interact within a batch): the caller then takes the flat
    gradients' path, and the model's notes say why."""

    def __init__(self, model: TrackedModel) -> None:
        self.model = model
        self.checked = False
        self.fallback: str | None = None

    def __call__(self, vectors: Tensor, indices: Sequence[int]) -> Tensor | None:
        if self.fallback is not None:
            return None
        indices = list(indices)
        try:
            out = self._directional(vectors, indices)
            if not self.checked:
                self._check(vectors, indices, out)
        except InfluenceStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - an op without a forward-mode or batching rule
            self._fall_back(f"forward mode failed ({str(exc).strip().splitlines()[0][:200] if str(exc) else exc})")
        return out if self.fallback is None else None

    def _directional(self, vectors: Tensor, indices: list[int]) -> Tensor:
        model = self.model
        v = vectors.to(model.device, model.dtype)
        flat = model.flat.detach()
        step = self._batch_size(len(v))
        out = []
        with torch.no_grad(), model.eval_mode():
            for start in range(0, len(indices), step):
                batch = model.batch("train", indices[start:start + step])
                along = vmap(lambda t: jvp(lambda f: model._losses(f, batch), (flat,), (t,))[1])
                out.append(along(v).to(torch.float64).cpu())
        return torch.cat(out, dim=1)

    def _batch_size(self, num_vectors: int) -> int:
        """Examples per forward-mode pass: about a cache's worth of tangents on the CPU, independent of the
        budget (the same bits in any process); on a GPU, what the budget allows."""
        model = self.model
        per_example = 3 * num_vectors * model.activation_floats()
        if model.device.type == "cpu":
            return max(1, CPU_PIECE_BYTES // (per_example * model.itemsize))
        return model.chunk_size(per_example, cap=len(model.task.train))

    def _check(self, vectors: Tensor, indices: list[int], out: Tensor) -> None:
        self.checked = True
        first = indices[:CHECK_EXAMPLES]
        g = self.model.per_example_grads("train", first)
        expected = (vectors.to(torch.float64) @ g.to(vectors.device, torch.float64).T).cpu()
        # Relative to the largest dot of the batch, not only of the checked examples: for an example the model
        # is sure of, softmax's tiny probabilities vanish from forward mode's sums (1 + 1e-16 = 1), so its
        # dots, far below what the scores resolve, come out 0 while its gradient keeps them.
        scale = max(float(expected.abs().max()), float(out.abs().max()), 1e-30)
        error = float((out[:, :len(first)] - expected).abs().max()) / scale
        if error > 1e-3:
            self._fall_back(f"directional derivatives disagreed with per-example gradients (relative error "
                            f"{error:.1e}: examples interact within a batch)")

    def _fall_back(self, why: str) -> None:
        self.fallback = why
        self.model.notes.append(f"training scores from per-example gradients: {why}")
