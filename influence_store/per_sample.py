"""Per-example gradients from one batched forward and backward, for models that vmap cannot trace.

``vmap(grad(...))`` needs a forward pass that torch.func can trace; models that call ``.item()``,
assign through boolean masks or branch on data (AllenNLP's CNN and LSTM encoders) cannot be. For the
common layers the per-example gradient is a product of what the layer saw and what came back to it
(Goodfellow 2015; the method of Opacus' ``GradSampleModule``): with ``A_i`` the input and ``G_i`` the
gradient of example i's loss with respect to the layer's output,

- ``Linear``: ``dW_i = sum_t G_i[t]^T A_i[t]``, ``db_i = sum_t G_i[t]``;
- ``Conv1d``/``Conv2d``: the same over the unfolded input patches;
- ``Embedding``: ``G_i`` rows added into the rows of the looked-up indices (the padding row gets none).

So one forward over the batch (the loss returns one value per example) and one backward to the layer
outputs give every example's gradient. This holds when examples do not interact inside the batch (no
batch norm); ``TrackedModel`` checks the first batch against autograd before trusting it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class Unsupported(Exception):
    """This model's tracked parameters cannot all be served by per-sample hooks."""


def _kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return "conv"
    weight = getattr(module, "weight", None)
    # torch.nn.Embedding, and embeddings with the same contract (AllenNLP's token Embedding without a projection)
    if type(module).__name__ == "Embedding" and isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 \
            and getattr(module, "max_norm", None) is None and getattr(module, "_projection", None) is None \
            and not getattr(module, "sparse", False) and set(dict(module.named_parameters())) == {"weight"}:
        return "embedding"
    return None


FASTER_THAN_VMAP = ("linear", "embedding")  # layers whose hooks beat vmap(grad) (docs/engine.md, "Gradients")


def plan(model: torch.nn.Module, tracked: Sequence[str],
         kinds: Sequence[str] = ("linear", "conv", "embedding")) -> dict[str, tuple[str, str]]:
    """Map each tracked parameter name to (owning module name, "weight"|"bias"), or raise Unsupported when one
    belongs to a layer that is not of ``kinds``."""
    modules = dict(model.named_modules())
    owners = {}
    for name in tracked:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None or leaf not in ("weight", "bias") or _kind(module) not in kinds:
            kind = type(module).__name__ if module is not None else "?"
            raise Unsupported(f"parameter {name!r} belongs to a {kind}, which has no per-sample rule")
        owners[name] = (owner, leaf)
    return owners


class Capture:
    """Forward hooks that keep each hooked layer's input and output during one forward pass."""

    def __init__(self, model: torch.nn.Module, owners: dict[str, tuple[str, str]]) -> None:
        self.modules = {o: dict(model.named_modules())[o] for o, _ in owners.values()}
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator["Capture"]:
        self.seen = {}
        handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():  # a forward without gradients (a loss checking itself) has no backward
                return
            if name in self.seen:
                raise Unsupported(f"layer {name!r} runs more than once per forward pass")
            if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
                raise Unsupported(f"layer {name!r} is not called with one tensor")
            self.seen[name] = (inputs[0].detach(), output)
        return hook


def per_sample_grads(capture: Capture, owners: dict[str, tuple[str, str]], losses: Tensor,
                     names: Sequence[str]) -> Tensor:
    """[m, p] gradients of each ``losses[i]`` over ``names`` (in order), from the captured layers."""
    m = losses.shape[0]
    missing = [o for o in capture.modules if o not in capture.seen]
    used = [o for o in capture.modules if o in capture.seen and capture.seen[o][1].requires_grad]
    outputs = [capture.seen[o][1] for o in used]
    grads = dict(zip(used, torch.autograd.grad(losses.sum(), outputs, allow_unused=True))) if outputs else {}
    pieces = []
    for name in names:
        owner, leaf = owners[name]
        module = capture.modules[owner]
        param = getattr(module, leaf)
        g_out = grads.get(owner)
        if owner in missing or g_out is None:  # the layer did not take part in the loss
            pieces.append(torch.zeros(m, param.numel(), dtype=losses.dtype, device=losses.device))
            continue
        inputs = capture.seen[owner][0]
        if inputs.shape[0] != m or g_out.shape[0] != m:
            raise Unsupported(f"layer {owner!r} does not see the batch in its first dimension")
        pieces.append(_layer_grad(_kind(module), module, leaf, inputs, g_out).reshape(m, -1).to(losses.dtype))
    return torch.cat(pieces, dim=1)


def _layer_grad(kind: str, module, leaf: str, a: Tensor, g: Tensor) -> Tensor:
    m = g.shape[0]
    if kind == "linear":
        g = g.reshape(m, -1, g.shape[-1])
        if leaf == "bias":
            return g.sum(1)
        return torch.einsum("mto,mti->moi", g, a.reshape(m, -1, a.shape[-1]).to(g.dtype))
    if kind == "conv":
        if leaf == "bias":
            return g.reshape(m, g.shape[1], -1).sum(2)
        two_d = isinstance(module, torch.nn.Conv2d)
        x = a if two_d else a.unsqueeze(2)
        pair = (lambda v: tuple(v)) if two_d else (lambda v: (1,) + tuple(v))
        zero = (lambda v: tuple(v)) if two_d else (lambda v: (0,) + tuple(v))
        patches = F.unfold(x.to(g.dtype), kernel_size=pair(module.kernel_size), dilation=pair(module.dilation),
                           padding=zero(module.padding), stride=pair(module.stride))  # [m, C*k, L]
        return torch.einsum("mol,mcl->moc", g.reshape(m, g.shape[1], -1), patches)
    # embedding
    weight = module.weight
    index = a.reshape(m, -1)
    rows = g.reshape(m, -1, g.shape[-1])
    out = torch.zeros(m, weight.shape[0], weight.shape[1], dtype=g.dtype, device=g.device)
    out.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), rows)
    padding = getattr(module, "padding_idx", getattr(module, "padding_index", None))
    if padding is not None:
        out[:, padding] = 0
    return out
