"""Training-example gradients in train mode (``--model-mode train``: dropout on, as SimpleInfluence takes them).

Dropout draws its masks for a whole vmapped batch at once, so an example's mask would depend on the batch it
fell in, and batches come from the memory budget. Train-mode gradients are therefore always taken in fixed
groups of ``GROUP`` consecutive training examples, each seeded by its position: an example's mask, and so
every score, depends only on the run's seed and the example's position, whatever the budget, the chunking,
or which process computes it. Batch normalization is refused in train mode: it normalizes by the batch's
statistics (so examples would interact) and updates the model's running statistics. ``model_in_mode`` puts a
model in either mode for a while (for every gradient and for evaluation).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .errors import InfluenceStoreError

if TYPE_CHECKING:
    from .gradients import TrackedModel

GROUP = 16  # training examples per train-mode gradient batch, aligned to multiples of GROUP


@contextlib.contextmanager
def model_in_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """``model`` in train (dropout on) or eval mode for the duration, restoring the caller's mode afterwards."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def check_train_mode(model: torch.nn.Module) -> None:
    """Refuse train mode for a model whose layers use batch statistics in training."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise InfluenceStoreError(
                "{train_mode} cannot be used with batch normalization (layer {layer!r}): in train mode it "
                "normalizes by each batch's statistics and changes the model's running statistics; use {eval_mode}",
                train_mode='model_mode="train"', layer=name, eval_mode='model_mode="eval"')


def aligned(indices: Sequence[int], n: int) -> bool:
    """Whether ``indices`` are exactly one whole group."""
    if not indices:
        return True
    start = indices[0]
    return start % GROUP == 0 and list(indices) == list(range(start, min(start + GROUP, n)))


def grouped_grads(model: TrackedModel, indices: Sequence[int]) -> torch.Tensor:
    """Per-example train-mode gradients of ``indices`` [len, p], each from its whole group."""
    n, position = len(model.task.train), {i: k for k, i in enumerate(indices)}
    out = None
    for group in sorted({i // GROUP for i in indices}):
        members = list(range(group * GROUP, min((group + 1) * GROUP, n)))
        grads = model.per_example_grads("train", members)
        if out is None:
            out = grads.new_empty(len(indices), grads.shape[1])
        for k, i in enumerate(members):
            if i in position:
                out[position[i]] = grads[k]
    return out
