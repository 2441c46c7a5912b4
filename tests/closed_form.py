"""Closed-form L2 logistic regression influence, written without influence_store, to check it against.

Parameters are ``theta = [weight, bias]`` (the tracked order of ``torch.nn.Linear``), so every
design matrix carries a trailing column of ones.
"""

import torch


def design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def theta(model: torch.nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def hessian(model, x, l2, indices=None) -> torch.Tensor:
    """``X^T diag(p(1-p)) X / n + l2 I`` over the examples at ``indices`` (all by default)."""
    xb = design(x if indices is None else x[indices])
    p = torch.sigmoid(xb @ theta(model))
    return (xb.T * (p * (1 - p))) @ xb / len(xb) + l2 * torch.eye(xb.shape[1], dtype=x.dtype)


def grads(model, x, y) -> torch.Tensor:
    """Per-example gradients ``(p - y) x`` of the unregularized loss, [n, p]."""
    xb = design(x)
    return (torch.sigmoid(xb @ theta(model)) - y)[:, None] * xb


def scores(task, damping: float = 0.0) -> torch.Tensor:
    """``g_test^T (H + damping I)^-1 g_train`` for every test x train pair, [n_test, n_train]."""
    xtr, ytr = task.train.tensors
    xte, yte = split_tensors(task)
    h = hessian(task.model, xtr, task.l2)
    inverse_g_test = torch.linalg.solve(h + damping * torch.eye(len(h), dtype=h.dtype), grads(task.model, xte, yte).T)
    return inverse_g_test.T @ grads(task.model, xtr, ytr).T


def split_tensors(task):
    """The test split as (x, y), also when it is a Subset of a TensorDataset."""
    data = task.test
    if hasattr(data, "tensors"):
        return data.tensors
    x, y = data.dataset.tensors
    index = torch.as_tensor(list(data.indices))
    return x[index], y[index]


def mean_loss(model, x, y) -> torch.Tensor:
    logits = design(x) @ theta(model)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
