"""The layer view of a model: each tracked layer's inputs and output gradients, for Kronecker factors.

Beside the flat-vector view (``TrackedModel``: per-example gradients, HVPs), Kronecker-factored
approximators need, per layer, the input rows ``a`` and the gradients ``ds`` of the layer's output,
because a layer's per-example weight gradient is ``G_i = sum_t ds_it a_it^T`` (t runs over positions:
1 for a plain Linear, output pixels for a convolution, tokens for a sequence).

A layer is tracked when the freezing policy tracks its weight: Linear, Conv1d and Conv2d (zero padding,
one group) and Embedding. Its bias, when tracked too, is the last input column (a constant 1). Every
other tracked parameter is a *diagonal* parameter: the approximator gives it a diagonal block.

Layers are seen in matrix form ``[out, in]`` (``in`` counts the bias column); ``LayerView.to_matrices``
and ``from_matrices`` convert between flat vectors [k, p] (order of the tracked names) and those.
Module hooks are registered only for the duration of one forward pass and removed after it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .errors import InfluenceStoreError
from .gradients import TrackedModel

FISHER_TYPES = ("true", "empirical", "gauss-newton")


@dataclass
class Layer:
    """One tracked module in matrix form: ``weight`` (and ``bias``) slices of the flat vector."""

    name: str
    module: torch.nn.Module
    kind: str  # "linear", "conv" or "embedding"
    weight: slice
    bias: slice | None
    out_dim: int
    in_dim: int  # including the bias column

    def rows(self, inputs: Tensor) -> Tensor:
        """The layer's input rows [B, T, in] (an Embedding's are token ids [B, T])."""
        m = self.module
        if self.kind == "embedding":
            return inputs.reshape(inputs.shape[0], -1)
        if self.kind == "linear":
            a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        elif isinstance(m, torch.nn.Conv2d):
            a = patches(inputs, m.kernel_size, m.dilation, m.padding, m.stride)
        else:  # Conv1d as a Conv2d of height 1
            a = patches(inputs.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]), (0, m.padding[0]),
                        (1, m.stride[0]))
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a

    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Gradients of the layer's output as rows [B, T, out]."""
        if self.kind == "conv":
            return grad_output.reshape(grad_output.shape[0], self.out_dim, -1).transpose(1, 2)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def per_example_grads(self, a: Tensor, ds: Tensor) -> Tensor:
        """``G_i = sum_t ds_it a_it^T`` for each example, [B, out, in]."""
        if self.kind == "embedding":
            g = ds.new_zeros(ds.shape[0], self.out_dim, self.in_dim)
            index = a.unsqueeze(1).expand(-1, self.out_dim, -1)
            return g.scatter_add_(2, index, ds.transpose(1, 2))
        return torch.einsum("bto,bti->boi", ds, a)


def patches(x: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """``unfold(x).transpose(1, 2)``, [B, positions, C*kh*kw], from kh*kw strided slices (im2col is slow on
    CPU in torch 2.13)."""
    b, c = x.shape[:2]
    x = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    ho = (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = x.new_empty(b, ho, wo, c, kernel[0], kernel[1])
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dilation[0], j * dilation[1]
            rows = slice(top, top + (ho - 1) * stride[0] + 1, stride[0])
            columns = slice(left, left + (wo - 1) * stride[1] + 1, stride[1])
            piece = x[:, :, rows, columns]
            out[..., i, j] = piece.permute(0, 2, 3, 1)
    return out.reshape(b, ho * wo, c * kernel[0] * kernel[1])


def _supported(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, torch.nn.Embedding):
        return module.max_norm is None
    return False


class LayerView:
    """The tracked layers of a ``TrackedModel`` and a forward pass that captures their rows."""

    def __init__(self, model: TrackedModel) -> None:
        self.model = model
        offsets, start = {}, 0
        for name, size in zip(model.names, model.sizes):
            offsets[name] = slice(start, start + size)
            start += size
        self.layers: list[Layer] = []
        covered: set[str] = set()
        for name, module in model.task.model.named_modules():
            weight = f"{name}.weight" if name else "weight"
            if not _supported(module) or weight not in offsets:
                continue
            bias_name = f"{name}.bias" if name else "bias"
            has_bias = bias_name in offsets and getattr(module, "bias", None) is not None
            if isinstance(module, torch.nn.Embedding):
                kind, out_dim, in_dim = "embedding", module.embedding_dim, module.num_embeddings
                has_bias = False
            elif isinstance(module, torch.nn.Linear):
                kind, out_dim, in_dim = "linear", module.out_features, module.in_features + has_bias
            else:
                kind, out_dim = "conv", module.out_channels
                in_dim = module.weight[0].numel() + has_bias
            self.layers.append(Layer(name, module, kind, offsets[weight], offsets[bias_name] if has_bias else None,
                                     out_dim, in_dim))
            covered.update([weight] + ([bias_name] if has_bias else []))
        self.diagonal_names = [n for n in model.names if n not in covered]
        self.diagonal_slices = [offsets[n] for n in self.diagonal_names]

    # ---------- flat vectors <-> layer matrices ----------
    def to_matrices(self, vectors: Tensor) -> list[Tensor]:
        """Each layer's block of ``vectors`` [k, p] as [k, out, in]."""
        return [self.matrix(vectors, layer) for layer in self.layers]

    def from_matrices(self, matrices: Sequence[Tensor], result: Tensor) -> Tensor:
        """Write each layer's [k, out, in] block into ``result`` [k, p] (inverse of ``to_matrices``)."""
        for layer, m in zip(self.layers, matrices):
            self.set_matrix(layer, m, result)
        return result

    @staticmethod
    def matrix(vectors: Tensor, layer: Layer) -> Tensor:
        """One layer's block of ``vectors`` [k, p] as [k, out, in] (a view where the layer has no bias)."""
        k = vectors.shape[0]
        w = vectors[:, layer.weight]
        w = w.reshape(k, layer.in_dim, layer.out_dim).transpose(1, 2) if layer.kind == "embedding" else \
            w.reshape(k, layer.out_dim, -1)
        return torch.cat([w, vectors[:, layer.bias].unsqueeze(-1)], dim=-1) if layer.bias else w

    @staticmethod
    def set_matrix(layer: Layer, m: Tensor, result: Tensor) -> None:
        """Write one layer's [k, out, in] block into ``result`` [k, p] (inverse of ``matrix``)."""
        k = m.shape[0]
        if layer.bias is not None:
            result[:, layer.bias] = m[..., -1]
            m = m[..., :-1]
        w = m.transpose(1, 2) if layer.kind == "embedding" else m
        result[:, layer.weight] = w.reshape(k, -1)

    def diagonal(self, vectors: Tensor) -> Tensor:
        """The diagonal parameters' entries of ``vectors`` [k, p] as [k, d]."""
        if not self.diagonal_slices:
            return vectors.new_zeros(vectors.shape[0], 0)
        return torch.cat([vectors[:, s] for s in self.diagonal_slices], dim=1)

    def set_diagonal(self, values: Tensor, result: Tensor) -> Tensor:
        start = 0
        for s in self.diagonal_slices:
            size = s.stop - s.start
            result[:, s] = values[:, start:start + size]
            start += size
        return result

    def diagonal_model(self) -> TrackedModel:
        """The diagonal parameters as a model of their own, for their flat per-example gradients (in the
        order of ``diagonal``); built once."""
        if getattr(self, "_diagonal_model", None) is None:
            tm = self.model
            self._diagonal_model = TrackedModel(tm.task, self.diagonal_names, device=tm.device, dtype=tm.dtype,
                                                memory_budget_mb=tm.memory_budget / 2**20, model_mode=tm.mode)
        return self._diagonal_model

    def dot_gradients(self, vectors: Tensor, indices: Sequence[int]) -> Tensor:
        """``vectors @ g_i`` [k, len(indices)] (float64) for the training examples' per-example gradients
        ``g_i``, without forming them flat. Per batch of examples (one forward and backward), a one-position
        layer contributes ``ds_i . (V a_i)``, one GEMM of every vector's block against the input rows; a
        layer with positions (a convolution, a sequence) forms the batch's ``G_i = sum_t ds_it a_it^T`` (as
        many at a time as the memory budget allows) and multiplies those. Eval mode, like ``captures``."""
        tm, k, indices = self.model, vectors.shape[0], list(indices)
        vectors = vectors.to(tm.device, tm.dtype)
        matrices = [self.matrix(vectors, layer).contiguous() for layer in self.layers]  # [k, out, in], once
        diagonal = self.diagonal(vectors) if self.diagonal_names else None
        total = torch.zeros(k, len(indices), dtype=torch.float64, device=tm.device)
        batch = tm.grad_chunk_size()
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            (captured,) = self.captures(chunk, "empirical")
            for layer, m, (a, ds) in zip(self.layers, matrices, captured):
                rows = layer.kind != "embedding" and ds.shape[1] == 1
                per_example = k * layer.out_dim if rows else layer.out_dim * layer.in_dim  # floats held
                step = max(1, tm.memory_budget // (4 * a.element_size() * per_example))
                for s in range(0, len(a), step):
                    into = total[:, start + s:start + min(s + step, len(a))]
                    if rows:
                        va = (m.reshape(-1, layer.in_dim) @ a[s:s + step, 0].T).reshape(k, layer.out_dim, -1)
                        into += (va * ds[s:s + step, 0].T).sum(1).to(torch.float64)
                    else:
                        grads = layer.per_example_grads(a[s:s + step], ds[s:s + step])
                        into += (m.reshape(k, -1) @ grads.reshape(len(grads), -1).T).to(torch.float64)
            if diagonal is not None:
                grads = self.diagonal_model().per_example_grads("train", chunk).to(tm.device, tm.dtype)
                total[:, start:start + len(chunk)] += (diagonal @ grads.T).to(torch.float64)
        return total

    def reproduces_gradients(self, examples: int = 2) -> bool:
        """Whether ``dot_gradients`` equals the flat per-example gradients' dot products on the first
        training examples. It does not when a tracked parameter is also used outside its own layer (tied
        weights), a use the hooks cannot see."""
        indices = list(range(min(examples, len(self.model.task.train))))
        if not indices:
            return True
        flat = self.model.per_example_grads("train", indices)
        want = (flat @ flat.T).to(torch.float64)
        got = self.dot_gradients(flat, indices).cpu()
        return bool(torch.allclose(got, want.cpu(), rtol=1e-3, atol=1e-3 * float(want.abs().max())))

    # ---------- capture ----------
    def captures(self, indices: Sequence[int], fisher: str = "empirical",
                 generator: torch.Generator | None = None, samples: int = 1) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Forward the training examples at ``indices`` once; yield, per backward pass, each layer's
        (input rows, output-gradient rows).

        ``empirical``: one pass backpropagating the examples' own losses. ``gauss-newton``: one pass per
        column ``r_c`` of the symmetric square root of each example's output Hessian ``H_i = R_i R_i^T``
        (their outer products sum to ``J^T H J`` exactly). ``true``: ``samples`` passes, each
        backpropagating ``R_i z`` with ``z ~ N(0, I)`` (seeded), whose covariance is ``H_i``: for softmax
        cross-entropy that is the Fisher of the model's own predictive distribution.
        """
        if fisher not in FISHER_TYPES:
            raise InfluenceStoreError(f"unknown Fisher type {fisher!r}; use one of {', '.join(FISHER_TYPES)}")
        tm = self.model
        batch = tm.batch("train", list(indices))
        flat = tm.flat.detach().requires_grad_(True)
        with tm.eval_mode(), self._hooks() as (calls, outputs):
            losses = tm._losses(flat, batch)
        uncalled = [layer.name for layer in self.layers if not calls[layer.name]]
        if uncalled:  # e.g. nn.MultiheadAttention reads out_proj.weight itself: the hooks see no input rows
            pattern = f"{uncalled[0]}." if len(uncalled) == 1 else f"({'|'.join(uncalled)})."
            more = f" (and {len(uncalled) - 1} more)" if len(uncalled) > 1 else ""
            raise InfluenceStoreError(
                "layer {layer!r}{more} is tracked but the loss never calls it: its weight is used without calling "
                "the module (as nn.MultiheadAttention uses its out_proj) or not at all, so its inputs cannot be "
                "seen; freeze it with {freeze_pattern}, or use {approximator_exact} or {approximator_lissa}",
                layer=uncalled[0], more=more, pattern=pattern,
                freeze_pattern=f'freeze="regex", freeze_options={{"patterns": [{pattern!r}]}}',
                approximator_exact='approximator="exact"', approximator_lissa='approximator="lissa"')
        rows = [[layer.rows(x.detach()) for x, _ in calls[layer.name]] for layer in self.layers]
        layer_outputs = [y for layer in self.layers for _, y in calls[layer.name]]
        if fisher == "empirical":
            yield self._gradient_rows(rows, calls, torch.autograd.grad(losses.sum(), layer_outputs, allow_unused=True))
            return
        if len(outputs) != 1 or not isinstance(outputs[0], Tensor):
            raise InfluenceStoreError("the {fisher} Fisher needs the model called once per batch with a tensor "
                                      "output; use the empirical Fisher: {fisher_empirical}", fisher=fisher,
                                      fisher_empirical='options={"fisher": "empirical"}')
        root = output_hessian_root(losses, outputs[0])  # [B, C, C]
        if fisher == "gauss-newton":
            directions = [root[:, :, c] for c in range(root.shape[-1])]
        else:
            directions = [(root @ torch.randn(root.shape[:2] + (1,), generator=generator, dtype=torch.float64)
                           .to(root.device)).squeeze(-1) / samples ** 0.5 for _ in range(samples)]
        z = outputs[0]
        for d in directions:
            grads = torch.autograd.grad(z, layer_outputs, grad_outputs=d.to(z.dtype).reshape(z.shape),
                                        retain_graph=True, allow_unused=True)
            yield self._gradient_rows(rows, calls, grads)

    def _gradient_rows(self, rows, calls, grads) -> list[tuple[Tensor, Tensor]]:
        grads, out = list(grads), []
        for layer, a in zip(self.layers, rows):
            n = len(calls[layer.name])
            gs, grads = grads[:n], grads[n:]
            ds = [layer.output_rows(torch.zeros_like(y) if g is None else g.detach())
                  for g, (_, y) in zip(gs, calls[layer.name])]
            a, ds = torch.cat(a, dim=1), torch.cat(ds, dim=1)  # several calls of one module: more positions
            if layer.kind == "embedding" and layer.module.padding_idx is not None:
                ds = ds * (a != layer.module.padding_idx).unsqueeze(-1)  # the padding row gets no gradient
            out.append((a, ds))
        return out

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[tuple[dict[str, list], list]]:
        calls: dict[str, list] = {layer.name: [] for layer in self.layers}
        outputs: list = []
        handles = [layer.module.register_forward_hook(
            lambda module, inputs, output, name=layer.name: calls[name].append((inputs[0], output)))
            for layer in self.layers]
        handles.append(self.model.task.model.register_forward_hook(lambda m, i, output: outputs.append(output)))
        try:
            yield calls, outputs
        finally:
            for handle in handles:
                handle.remove()


def output_hessian(losses: Tensor, output: Tensor, max_outputs: int = 512) -> Tensor:
    """Each example's loss Hessian in the model's output, [B, C, C] float64 (C values per example)."""
    b = output.shape[0]
    c = output[0].numel()
    if c > max_outputs:
        raise InfluenceStoreError("the model's output has {c} values per example (more than {max_outputs}) for "
                                  "the output Hessian; use the empirical Fisher: {fisher_empirical}", c=c,
                                  max_outputs=max_outputs, fisher_empirical='options={"fisher": "empirical"}')
    (g,) = torch.autograd.grad(losses.sum(), output, create_graph=True)
    g = g.reshape(b, c)
    if not g.requires_grad:  # loss linear in the output: zero curvature
        return torch.zeros(b, c, c, dtype=torch.float64, device=output.device)
    cols = [torch.autograd.grad(g[:, j].sum(), output, retain_graph=True, allow_unused=True)[0] for j in range(c)]
    h = torch.stack([torch.zeros_like(output) if col is None else col for col in cols], dim=-1)
    h = h.reshape(b, c, c).detach().to(torch.float64)
    return (h + h.transpose(1, 2)) / 2


def output_hessian_root(losses: Tensor, output: Tensor) -> Tensor:
    """Symmetric square roots ``R_i`` [B, C, C] of the output Hessians; negative eigenvalues (a loss
    non-convex in the output) are clipped at zero, as Gauss-Newton does."""
    values, vectors = torch.linalg.eigh(output_hessian(losses, output))
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)


def gauss_newton_product(view: LayerView, vectors: Tensor, batch_size: int = 256) -> Tensor:
    """``(J^T H_out J / n + l2 I) v`` over the training set for each row v of ``vectors`` [k, p]: the
    Gauss-Newton counterpart of ``TrackedModel.hvp`` (positive semi-definite where the loss is convex in
    the output). ``J v`` comes from differentiating the linear map ``u -> J^T u`` (double backward)."""
    tm = view.model
    v = vectors.to(tm.device, tm.dtype)
    k, n = v.shape[0], len(tm.task.train)
    total = torch.zeros_like(v)
    for idx in batches(n, batch_size):
        flat = tm.flat.detach().requires_grad_(True)
        with tm.eval_mode(), view._hooks() as (_, outputs):
            losses = tm._losses(flat, tm.batch("train", idx))
        z = outputs[-1]
        h = output_hessian(losses, z)
        u = torch.zeros_like(z, requires_grad=True)
        (jtu,) = torch.autograd.grad(z, flat, grad_outputs=u, create_graph=True)
        jv = torch.stack([torch.autograd.grad(jtu, u, grad_outputs=row, retain_graph=True)[0] for row in v])
        hjv = torch.einsum("bij,kbj->kbi", h, jv.reshape(k, len(idx), -1).to(torch.float64))
        total += torch.stack([torch.autograd.grad(z, flat, grad_outputs=w.to(z.dtype).reshape(z.shape),
                                                  retain_graph=True)[0] for w in hjv])
    return total / n + tm.l2 * v


def batches(n: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, n, batch_size):
        yield list(range(start, min(start + batch_size, n)))


def describe(view: LayerView) -> dict[str, Any]:
    """What the view tracks, for diagnostics."""
    return {"layers": [{"name": layer.name, "kind": layer.kind, "shape": [layer.out_dim, layer.in_dim]}
                       for layer in view.layers],
            "diagonal_parameters": view.diagonal_names}
