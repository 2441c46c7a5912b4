"""The task contract: what a user hands influence-store, and how a task spec becomes one.

A ``Task`` is a model, a per-example loss, training and test examples, and the L2 coefficient of the
training objective ``mean_i loss_i + l2/2 * ||theta||^2``. Everything downstream reads only this.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import InfluenceStoreError


def default_collate(examples: list) -> Any:
    """Stack examples into a batch the way a PyTorch DataLoader does."""
    from torch.utils.data import default_collate as collate

    return collate(examples)


@dataclass
class Task:
    """A model, its per-example loss, and the data to compute influence on.

    ``loss(model, batch)`` returns one loss per example (shape ``[batch_size]``); ``key(example)``
    gives a stable string id (default: the position); ``l2`` enters the Hessian as ``l2 * I``;
    ``fit(examples)`` (optional) retrains a model from scratch, which verification uses;
    ``label`` and ``payload`` (optional) describe an example for display and export;
    ``accuracy(model, batch)`` (optional) returns per-example correctness (1/0) for verification reports;
    ``render(example)`` (optional) shows an example to a curator: an image (2-D/3-D array or PIL image),
    text, or a small mapping of fields (default: the payload, see ``influence_store.render``);
    ``relabel(example, label)`` (optional) returns a copy of the example with a corrected label (default:
    a dict's ``"label"`` item or the second item of an (input, label) pair).
    """

    model: Any
    loss: Callable[[Any, Any], Any]
    train: Sequence
    test: Sequence
    l2: float = 0.0
    collate: Callable[[list], Any] = default_collate
    key: Callable[[Any], str] | None = None
    fit: Callable[[Sequence], Any] | None = None
    label: Callable[[Any], Any] | None = None
    payload: Callable[[Any], Any] | None = None
    name: str | None = None
    accuracy: Callable[[Any, Any], Any] | None = None
    metadata: dict = field(default_factory=dict)
    render: Callable[[Any], Any] | None = None
    relabel: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        import torch

        if not isinstance(self.model, torch.nn.Module):
            raise InfluenceStoreError(f"task model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.loss):
            raise InfluenceStoreError("task loss must be a callable loss(model, batch) -> per-example losses")
        for split in ("train", "test"):
            data = getattr(self, split)
            if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
                raise InfluenceStoreError(f"task {split} data must be a sequence (len and indexing)")
            if len(data) == 0:
                raise InfluenceStoreError(f"task {split} data is empty; give at least one {split} example")
        if not (isinstance(self.l2, (int, float)) and math.isfinite(self.l2) and self.l2 >= 0):
            raise InfluenceStoreError(f"task l2 must be a finite number >= 0, got {self.l2!r}")

    def keys(self, split: str) -> list[str]:
        """Stable string ids of the examples of one split; duplicates are an error."""
        data = getattr(self, split)
        keys = [str(i) for i in range(len(data))] if self.key is None else [str(self.key(e)) for e in data]
        if len(set(keys)) != len(keys):
            seen, dup = set(), None
            for k in keys:
                if k in seen:
                    dup = k
                    break
                seen.add(k)
            raise InfluenceStoreError(f"task {split} keys are not unique (e.g. {dup!r}); make key(example) unique")
        return keys

    def batch(self, split: str, indices: Sequence[int]) -> Any:
        """Collate the examples at ``indices`` of one split into a batch."""
        import torch
        from torch.utils.data import TensorDataset

        data = getattr(self, split)
        # Slicing a plain TensorDataset gives the same batch as collating its examples one by one; a subclass
        # (its own __getitem__) or a task's own collate may transform examples, so those take the general path.
        if type(data) is TensorDataset and self.collate is default_collate:
            index = torch.as_tensor(list(indices), dtype=torch.long)
            return tuple(t[index] for t in data.tensors)
        return self.collate([data[i] for i in indices])

    def describe(self, example: Any) -> Any:
        """JSON-ready description of one example (its payload), used for display and export."""
        return to_jsonable(self.payload(example) if self.payload else example)

    def relabelled(self, example: Any, label: Any) -> Any:
        """The example with a corrected label (the task's ``relabel``, else ``with_label``)."""
        return self.relabel(example, label) if self.relabel is not None else with_label(example, label)

    def label_of(self, example: Any) -> Any:
        """The example's label for display, or None when the task does not say."""
        if self.label is not None:
            return to_jsonable(self.label(example))
        if isinstance(example, (tuple, list)) and len(example) == 2:
            return to_jsonable(example[1])
        if isinstance(example, dict) and "label" in example:
            return to_jsonable(example["label"])
        return None


def with_label(example: Any, label: Any) -> Any:
    """A copy of an example (or stored payload) with a new label: a dict's ``"label"``, or the second
    item of an (input, label) pair; anything else needs the task's own ``relabel``."""
    if isinstance(example, dict) and "label" in example:
        return {**example, "label": label}
    if isinstance(example, (tuple, list)) and len(example) == 2:
        return type(example)((example[0], label)) if isinstance(example, tuple) else [example[0], label]
    raise InfluenceStoreError(f"cannot relabel a {type(example).__name__} example: it is neither a dict with a "
                              f"'label' item nor an (input, label) pair; give the task a relabel(example, label)")


def to_jsonable(value: Any) -> Any:
    """Tensors and arrays become lists so an example can be stored and exported as JSON."""
    if value is None or type(value) in _PLAIN:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) in _PLAIN for v in value):  # fast path: a flat list of numbers or strings
            return list(value)
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


_PLAIN = {str, int, float, bool}


class PayloadJSON(str):
    """An example's description as canonical JSON text: encoded once, then hashed and stored as it is
    (encoding tens of thousands of examples is a visible share of a run)."""

    @classmethod
    def of(cls, description: Any) -> PayloadJSON:
        return cls(json.dumps(description, sort_keys=True, separators=(",", ":"), default=repr))


def content_hash(description: Any) -> str:
    """sha256 of an example's canonical JSON description: the same content gives the same hash."""
    text = description if isinstance(description, PayloadJSON) else PayloadJSON.of(description)
    return hashlib.sha256(text.encode()).hexdigest()


class TaskLoader:
    """Base for task loader plugins: ``load(target)`` returns a Task for the spec part after the prefix."""

    name: str = ""

    def __init__(self, options: Any) -> None:
        self.options = options

    def load(self, target: str) -> Task:  # pragma: no cover - interface
        raise NotImplementedError


def load_task(spec: str, options: dict | None = None) -> Task:
    """Resolve ``LOADER:TARGET`` through a registered loader, else treat the spec as Python."""
    from .options import parse_options
    from .plugin_manager import lookup, registry

    loaders = registry("register_task_loaders")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in loaders and prefix != "python":
        entry, target = loaders[prefix], rest
    else:
        entry, target = lookup("register_task_loaders", "python"), spec
    if getattr(entry.cls, "free_options", False):  # e.g. the python loader passes options on as keyword arguments
        loader = entry.cls(dict(options or {}))
    else:
        loader = entry.cls(parse_options(entry.options_cls, options, f"task loader {entry.name!r}"))
    task = loader.load(target)
    if not isinstance(task, Task):
        raise InfluenceStoreError(
            f"task spec {spec!r} returned {type(task).__name__}, not influence_store.Task; return a Task")
    if not task.name:  # the store's dataset name: the file (or module, or archive) the spec points at
        from pathlib import Path

        task.name = Path(target.split(":")[0]).name.split(".")[0] or None
    return task


def example_rows(task: Task, split: str) -> list[tuple[str, str, Any, Any]]:
    """(key, content hash, label, payload) of every example of one split, in order; the payload is its
    description already encoded (``PayloadJSON``)."""
    rows = []
    for key, example in zip(task.keys(split), getattr(task, split)):
        payload = PayloadJSON.of(task.describe(example))
        rows.append((key, content_hash(payload), task.label_of(example), payload))
    return rows
