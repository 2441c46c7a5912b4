"""The per-instance loss of an AllenNLP model (the ``allennlp`` task loader's ``Task.loss``).

SimpleInfluence differentiates ``output_dict["loss"]`` of each instance run as a batch of one. AllenNLP
models return a batch *mean*, so ``ModelLoss`` gets one value per instance from a whole batch: one ordinary
forward with the loss modules reducing by ``"none"`` where that matches instance-by-instance losses, else a
vmap-ed forward over single-instance batches, else one forward per instance. Metrics (accuracy, F1, ...) are
paused meanwhile: their ``.item()`` calls break vmap, and influence passes must not count towards them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from influence_store.errors import InfluenceStoreError


class ModelLoss:
    """``loss(model, batch)``: ``output_dict["loss"]`` of each instance as a batch of one, shape [m].

    Paths, fastest first: one ordinary forward over the whole batch with the model's mean-reducing loss
    modules switched to ``reduction="none"``, trusted once it matched the instance-by-instance losses of a
    first batch (per-sample hooks need this plain forward: ``per_sample.py``); else one vmap-ed forward over
    single-instance batches; else one forward per instance. ``path`` says which.
    """

    def __init__(self) -> None:
        self.vmap_works = True
        self.batched_works: bool | None = None  # None: not checked yet
        self.path = "batched"

    def __call__(self, model: Any, batch: dict) -> Any:
        from torch.func import vmap
        from torch.utils._pytree import tree_map

        size = _batch_size(batch)
        with metrics_paused(model):
            if size == 1:
                return model_loss(model, batch).reshape(1)
            if self.batched_works is None:
                self.batched_works = _batched_agrees(model, batch, size)
            losses = batched_losses(model, batch, size) if self.batched_works else None
            self.path = "batched"
            if losses is None and self.vmap_works:
                try:
                    losses = vmap(lambda one: model_loss(model, tree_map(lambda t: t.unsqueeze(0), one)),
                                  randomness="different")(batch)
                    self.path = "vmap"
                except InfluenceStoreError:
                    raise
                except Exception:  # noqa: BLE001 - any tracing failure: one forward per instance
                    self.vmap_works = False
            if losses is None:
                self.path = "per-instance"
                losses = per_instance_losses(model, batch, size)
            return losses


def per_instance_losses(model: Any, batch: dict, size: int) -> Any:
    """One forward per instance: what any model supports."""
    import torch
    from torch.utils._pytree import tree_map

    return torch.stack([model_loss(model, tree_map(lambda t: t[i:i + 1], batch)).reshape(()) for i in range(size)])


def _batched_agrees(model: Any, batch: dict, size: int, sample: int = 32) -> bool | None:
    """Whether the batched forward gives each instance its own loss here (checked in eval mode, no dropout;
    None when it cannot be checked now, e.g. under a forward-mode transform: a later call checks).

    Each instance alone is sliced from the padded batch, so padding is the same on both sides and only a true
    interaction between instances (batch statistics, attention across the batch) can differ; that touches
    every instance, so ``sample`` of them, spread over the batch, are checked: one forward each (1.3 s for
    the 1,000 instances of an AllenNLP LSTM's first call, when all were checked)."""
    import torch
    from torch.utils._pytree import tree_map

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = batched_losses(model, batch, size)
            if losses is None:
                return False
            picked = torch.linspace(0, size - 1, min(size, sample)).round().long().unique()
            some = tree_map(lambda t: t[picked] if torch.is_tensor(t) else [t[i] for i in picked.tolist()], batch)
            alone = per_instance_losses(model, some, len(picked))
            return bool(torch.allclose(losses[picked], alone, rtol=1e-4, atol=1e-6))
    except InfluenceStoreError:
        raise
    except Exception:  # noqa: BLE001
        return None
    finally:
        model.train(was_training)


def batched_losses(model: Any, batch: dict, size: int) -> Any:
    """Per-instance losses from one forward: the model's ``torch.nn`` loss modules that average over the
    batch (``reduction="mean"``) return one value per instance for the duration; None when that does not
    give a [size] loss (the loss is computed another way)."""
    import torch

    switched = [m for m in model.modules() if isinstance(m, torch.nn.modules.loss._Loss) and m.reduction == "mean"]
    if not switched:
        return None
    for module in switched:
        module.reduction = "none"
    try:
        output = model(**batch)
    finally:
        for module in switched:
            module.reduction = "mean"
    loss = output.get("loss") if isinstance(output, dict) else None
    return loss if loss is not None and tuple(loss.shape) == (size,) else None


def model_loss(model: Any, batch: dict) -> Any:
    """The model's ``output_dict["loss"]`` for a batch, or a one-line error when it has none."""
    output = model(**batch)
    if not isinstance(output, dict) or "loss" not in output:
        keys = ", ".join(map(str, output)) if isinstance(output, dict) else type(output).__name__
        raise InfluenceStoreError(
            f"{type(model).__name__}.forward returned no 'loss' (it returned: {keys}); influence needs the loss, "
            f"so the data must carry the targets (e.g. a label field) and forward must compute output_dict['loss']")
    return output["loss"]


@contextlib.contextmanager
def metrics_paused(model: Any):
    """Swap every AllenNLP ``Metric`` attribute of the model's modules for a no-op, restoring them after."""
    from allennlp.training.metrics import Metric

    swapped = []
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if isinstance(value, Metric):
                swapped.append((module, attr, value))
                setattr(module, attr, _NoMetric())
            elif isinstance(value, dict) and any(isinstance(m, Metric) for m in value.values()):
                swapped.append((module, attr, value))
                setattr(module, attr, {k: _NoMetric() if isinstance(m, Metric) else m for k, m in value.items()})
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


class _NoMetric:
    """Accepts a metric update and does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


def _batch_size(batch: dict) -> int:
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves(batch)
    if not leaves:
        raise InfluenceStoreError("the instances produced no tensors; the reader's fields cannot be batched")
    return leaves[0].shape[0]
