"""Bundled example: handwritten digits with 10% of the training labels flipped.

An L2-regularized softmax regression on scikit-learn's digits (shipped inside the package, no
download). Flipped labels are what a curator wants to find: they are harmful to the test loss and
have high self-influence. ``task()`` is the entry point: ``influence-store run examples/digits_noisy.py:task``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

import influence_store as ist

FLIP_RATE = 0.10
L2 = 1e-3
N_TRAIN = 1200
SEED = 0


def load_examples():
    """(train, test) lists of dicts with a stable id, pixels, the (possibly flipped) label."""
    digits = load_digits()
    x = digits.data / 16.0
    y = digits.target
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(y))
    flipped = set(rng.choice(N_TRAIN, size=int(FLIP_RATE * N_TRAIN), replace=False).tolist())
    train, test = [], []
    for position, i in enumerate(order):
        label = int(y[i])
        example = {"id": f"digit-{i}", "pixels": x[i].round(4).tolist(), "label": label, "original_label": label}
        if position < N_TRAIN:
            if position in flipped:
                example["label"] = int((label + rng.integers(1, 10)) % 10)
            train.append(example)
        else:
            test.append(example)
    return train, test


def collate(examples):
    x = torch.tensor([e["pixels"] for e in examples], dtype=torch.float64)
    y = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return x, y


def loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def fit(examples, l2: float = L2):
    """Train the softmax regression to a tight optimum of mean loss + l2/2 ||theta||^2."""
    torch.manual_seed(SEED)
    model = torch.nn.Linear(64, 10).double()
    x, y = collate(list(examples))
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=1000, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        value = loss(model, (x, y)).mean() + l2 / 2 * sum((p ** 2).sum() for p in model.parameters())
        value.backward()
        return value

    optimizer.step(objective)
    return model


def accuracy(model, batch):
    x, y = batch
    return (model(x).argmax(1) == y).double()


def render(example):
    """The 8x8 digit as an image (the curator sees what the label claims)."""
    return np.asarray(example["pixels"]).reshape(8, 8)


def read_jsonl(path):
    import json

    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def task(train_data: str | None = None) -> ist.Task:
    """The noisy digits task; ``train_data`` (a JSON-lines export) replaces the training set."""
    train, test = load_examples()
    if train_data:
        train = read_jsonl(train_data)
    return ist.Task(
        model=fit(train),
        loss=loss,
        train=train,
        test=test,
        l2=L2,
        collate=collate,
        key=lambda e: e["id"],
        fit=fit,
        label=lambda e: e["label"],
        accuracy=accuracy,
        render=render,
        name="digits-noisy",
    )


if __name__ == "__main__":
    t = task()
    computation = ist.compute_scores(t, approximator="exact", progress=True)
    scores = computation.matrix()
    train_keys, test_keys = t.keys("train"), t.keys("test")
    print(f"{scores.shape[0]} test x {scores.shape[1]} train scores ({ist.SIGN_CONVENTION})")
    for row in range(3):
        order = scores[row].argsort()
        print(f"test {test_keys[row]} (label {t.test[row]['label']}):")
        print("  most harmful:", [(train_keys[i], t.train[i]["label"], t.train[i]["original_label"],
                                   round(float(scores[row, i]), 3)) for i in order[:3].tolist()])
        print("  most helpful:", [(train_keys[i], t.train[i]["label"], round(float(scores[row, i]), 3))
                                  for i in order[-3:].flip(0).tolist()])
    self_influence = computation.self_influence()
    top = self_influence.argsort(descending=True)[:120].tolist()
    flipped = sum(t.train[i]["label"] != t.train[i]["original_label"] for i in top)
    print(f"flipped labels among the 120 highest self-influence examples: {flipped}/120")
