"""The ``allennlp`` task loader: an AllenNLP model archive plus train and test data, as a Task.

``influence-store run allennlp:model.tar.gz --train-data train.jsonl --test-data dev.jsonl`` scores what
AllenNLP's ``SimpleInfluence.from_path`` would, and ``task_from_model`` does the same for a live
``Model`` and ``DatasetReader``. AllenNLP is imported only when this loader runs, so the core never
needs it (install it with ``pip install --no-deps -r requirements-allennlp.txt``, see README).

How it matches SimpleInfluence:
- Data: train data through the archive's ``dataset_reader``; test data through its
  ``validation_dataset_reader`` (SimpleInfluence's ``test_dataset_reader``; ``use_test_reader=false``
  reads both with the training reader). Instances are indexed with the model's vocabulary.
- Loss: ``output_dict["loss"]`` of the model run on each instance as a batch of one, which is what
  SimpleInfluence differentiates per instance, from whole batches (``allennlp_loss.py``); the Hessian of
  their mean is the Hessian of the model's batch loss. Metrics are paused during these passes.
- Differences: every pass runs in eval mode, while SimpleInfluence computes training gradients in
  train mode, so with dropout the two differ (without dropout they agree to float rounding).
  ``MetadataField`` values are not passed to ``forward`` (they are not tensors and cannot be batched).
- L2: the archive's ``trainer.optimizer.weight_decay`` when set, else 0 (``-t l2 VALUE`` overrides;
  ``-t l2 0`` is SimpleInfluence, which ignores weight decay). For decoupled decay (AdamW) that is an
  approximation of the objective's curvature; a model ``regularizer`` is not read, give ``-t l2``.
- Keys: the ``id_field`` value of an instance's metadata (a ``MetadataField`` of that name, or a key
  of a metadata dict) when present, else the position; the store adds a content hash of
  ``Instance.human_readable_dict()``, so an example keeps its identity when the data is re-read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl

from .allennlp_loss import ModelLoss
from influence_store.options import option
from influence_store.task import Task, TaskLoader, to_jsonable

INSTALL_HINT = ("install AllenNLP 2.10.1 with `pip install --no-deps -r requirements-allennlp.txt` "
                "(the pinned set in the influence-store repository; see README 'AllenNLP models')")
UNREGISTERED = "is not a registered name"  # AllenNLP's registry error for a type that nothing imported


@dataclass
class AllenNLPExample:
    """One indexed AllenNLP ``Instance``, its key, and where it sits in its split's tensors."""

    key: str
    instance: Any
    position: int = 0
    split: SplitTensors | None = field(default=None, repr=False, compare=False)


class SplitTensors:
    """A split's instances tensorized once, padded to the longest; a batch is an index into them.

    AllenNLP pads each batch to its own longest instance and models mask the padding, so the extra
    padding changes nothing; it saves re-running ``Batch.as_tensor_dict`` (pure Python, ~0.2 ms per
    instance) for every LiSSA step, which was 40% of the time with full-batch steps.
    """

    def __init__(self, instances: list) -> None:
        self.instances = instances
        self._tensors: dict | None = None

    def take(self, positions: list[int]) -> dict:
        import torch
        from torch.utils._pytree import tree_map

        if self._tensors is None:
            self._tensors = tensor_dict(self.instances)
        index = torch.as_tensor(positions, dtype=torch.long)
        return tree_map(lambda t: t[index], self._tensors)


class AllenNLPTaskLoader(TaskLoader):
    """An AllenNLP model archive plus train and test data: allennlp:model.tar.gz."""

    name = "allennlp"

    @dataclass
    class Options:
        train_data: str | None = option(None, "training data path (default: the archive's train_data_path)")
        test_data: str | None = option(None, "test data path (default: the archive's validation_data_path)")
        use_test_reader: bool = option(
            True, "read test data with the archive's validation_dataset_reader (SimpleInfluence's test reader)")
        id_field: str = option("id", "metadata field whose value is an example's key; the position when absent")
        l2: float | None = option(None, "L2 coefficient in the Hessian (default: the optimizer's weight_decay, else 0)")
        cuda_device: int = option(-1, "device the archive is loaded onto (AllenNLP cuda_device; -1 = CPU)")
        overrides: str = option("", "JSON overrides applied to the archive's config, as in allennlp load_archive")

        def __post_init__(self) -> None:
            if self.l2 is not None and not self.l2 >= 0:
                raise ValueError("l2 must be >= 0")

    def load(self, target: str) -> Task:
        o = self.options
        archive = load_archive(target, cuda_device=o.cuda_device, overrides=o.overrides)
        config = archive.config.as_dict(quiet=True)
        train_data = o.train_data or config.get("train_data_path")
        test_data = o.test_data or config.get("validation_data_path")
        for split, path in (("train", train_data), ("test", test_data)):
            if not path:
                raise InfluenceStoreError("archive {target!r} names no {split} data; give {data_path}", target=target,
                                          split=split, data_path=f'task_options={{"{split}_data": PATH}}')
        weight_decay = _weight_decay(config)
        l2 = weight_decay if o.l2 is None else o.l2
        test_reader = archive.validation_dataset_reader if o.use_test_reader else archive.dataset_reader
        task = task_from_model(archive.model, archive.dataset_reader, train_data, test_data,
                               test_reader=test_reader, id_field=o.id_field, l2=l2)
        task.metadata.update(archive=str(target), l2_source="option" if o.l2 is not None else (
            "trainer.optimizer.weight_decay" if weight_decay else "none (no weight decay in the archive)"))
        return task


def task_from_model(model: Any, reader: Any, train_path: str, test_path: str, *, test_reader: Any = None,
                    id_field: str = "id", l2: float = 0.0, name: str | None = None) -> Task:
    """A Task for a live AllenNLP ``Model`` and ``DatasetReader`` (``test_reader`` defaults to ``reader``).

    Example::

        task = task_from_model(model, reader, "train.jsonl", "dev.jsonl")
        scores = influence_store.compute_scores(task, "lissa").matrix()
    """
    import torch

    _import_allennlp()
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "vocab"):
        raise InfluenceStoreError(f"expected an AllenNLP Model, got {type(model).__name__}")
    train = read_examples(reader, train_path, "train", model.vocab, id_field)
    test = read_examples(test_reader or reader, test_path, "test", model.vocab, id_field)
    return Task(
        model=model,
        loss=ModelLoss(),
        train=train,
        test=test,
        l2=l2,
        collate=collate,
        key=lambda example: example.key,
        label=lambda example: _label(example.instance),
        payload=lambda example: to_jsonable(example.instance.human_readable_dict()),
        render=render_instance,
        name=name or Path(str(train_path)).stem,
        metadata={"train_data": str(train_path), "test_data": str(test_path),
                  "reader": type(reader).__name__, "test_reader": type(test_reader or reader).__name__},
    )


def load_archive(path: str, cuda_device: int = -1, overrides: str = "") -> Any:
    """AllenNLP's ``load_archive`` (after its plugins), with one-line errors for what is not an archive."""
    _import_allennlp()
    from allennlp.models.archival import load_archive as allennlp_load_archive

    if not Path(path).is_file():
        raise InfluenceStoreError(f"model archive {path!r} does not exist; give the model.tar.gz of `allennlp train`")
    declared = _plugins_declared()
    if declared:
        _import_allennlp_plugins()
    try:
        with _quiet():
            try:
                return allennlp_load_archive(path, cuda_device=cuda_device, overrides=overrides)
            except Exception as exc:  # a type from an AllenNLP module that allennlp.models does not import
                if declared or UNREGISTERED not in str(exc):
                    raise
                _import_allennlp_plugins()
                return allennlp_load_archive(path, cuda_device=cuda_device, overrides=overrides)
    except Exception as exc:  # tarfile, JSON, registry and weight-loading errors all mean "not this archive"
        reason, fix = _first_line(exc), "give the model.tar.gz written by `allennlp train`"
        if UNREGISTERED in reason:  # custom code that nothing imported
            reason = reason.split(". ")[0]
            fix = "list the module that registers it in a .allennlp_plugins file in this folder, as AllenNLP needs"
        raise InfluenceStoreError(
            f"{path!r} is not a loadable AllenNLP model archive ({type(exc).__name__}: {reason}); {fix}") from None


def read_examples(reader: Any, path: str, split: str, vocab: Any, id_field: str = "id") -> list[AllenNLPExample]:
    """Read and index every instance of ``path``; the key is the ``id_field`` metadata value, else the position."""
    try:
        with _quiet():
            instances = list(reader.read(path))
            for instance in instances:
                instance.index_fields(vocab)
    except Exception as exc:  # readers raise anything from FileNotFoundError to KeyError on a bad line
        raise InfluenceStoreError(
            f"cannot read {split} data {str(path)!r} with {type(reader).__name__} "
            f"({type(exc).__name__}: {_first_line(exc)}); check the path and its format") from None
    if not instances:
        raise InfluenceStoreError(f"{type(reader).__name__} read no instances from {split} data {str(path)!r}")
    tensors = SplitTensors(instances)
    return [AllenNLPExample(str(_instance_id(inst, id_field, i)), inst, i, tensors) for i, inst in enumerate(instances)]


def collate(examples: list[AllenNLPExample]) -> dict:
    """The model's input tensors for these examples: a slice of their split's tensors when they share one."""
    split = examples[0].split
    if split is not None and all(e.split is split for e in examples):
        return split.take([e.position for e in examples])
    return tensor_dict([e.instance for e in examples])


def tensor_dict(instances: list) -> dict:
    """AllenNLP's padded tensor dict of the instances, without non-tensor (metadata) entries."""
    from allennlp.data import Batch
    from torch import Tensor
    from torch.utils._pytree import tree_leaves

    tensors = Batch(instances).as_tensor_dict()
    return {k: v for k, v in tensors.items() if all(isinstance(leaf, Tensor) for leaf in tree_leaves(v))}


def _weight_decay(config: dict) -> float:
    """The trainer's optimizer ``weight_decay``, read as the objective's L2 coefficient (0 when absent)."""
    optimizer = (config.get("trainer") or {}).get("optimizer")  # a dict, or just a type name
    return float(optimizer.get("weight_decay") or 0.0) if isinstance(optimizer, dict) else 0.0


def _instance_id(instance: Any, id_field: str, position: int) -> Any:
    from allennlp.data.fields import MetadataField

    for name, value in instance.fields.items():
        if not isinstance(value, MetadataField):
            continue
        if name == id_field:
            return value.metadata
        if isinstance(value.metadata, dict) and id_field in value.metadata:
            return value.metadata[id_field]
    return position


def render_instance(example: AllenNLPExample) -> dict:
    """What a curator reads: each ``TextField``'s tokens as text, other fields as AllenNLP prints them."""
    from allennlp.data.fields import TextField

    shown = {}
    for name, value in example.instance.fields.items():
        if isinstance(value, TextField):
            shown[name] = " ".join(str(token) for token in value.tokens)
        elif hasattr(value, "human_readable_repr"):
            shown[name] = to_jsonable(value.human_readable_repr())
    return shown


def _label(instance: Any) -> Any:
    label = instance.fields.get("label")
    return None if label is None else to_jsonable(label.human_readable_repr())


def _import_allennlp() -> None:
    try:
        with _quiet():
            import allennlp  # noqa: F401
            import allennlp.models  # noqa: F401  # the heavy part, imported once here, quietly
    except ImportError as exc:
        raise InfluenceStoreError(f"the allennlp task loader needs AllenNLP ({exc}); {INSTALL_HINT}") from None


def _plugins_declared() -> bool:
    """Whether AllenNLP would import a plugin: a plugins file (local or global) or a default plugin package."""
    import importlib.util

    from allennlp.common import plugins

    return (next(iter(plugins.discover_plugins()), None) is not None  # AllenNLP's own reading of the files
            or any(importlib.util.find_spec(name) is not None for name in plugins.DEFAULT_PLUGINS))


@functools.cache
def _import_allennlp_plugins() -> None:
    """AllenNLP's plugin discovery, as SimpleInfluence.from_path runs it, so that custom models register
    themselves. Without declared plugins it only imports AllenNLP's remaining modules (a quarter of a second),
    so then it runs only when an archive names a type they register. Once per process."""
    from allennlp.common import plugins

    try:
        with _quiet():
            plugins.import_plugins()
    except ImportError as exc:  # e.g. a package of the pinned set is missing
        raise InfluenceStoreError(f"AllenNLP's modules do not all import ({exc}); {INSTALL_HINT}") from None


@contextlib.contextmanager
def _quiet():
    """AllenNLP's imports, archive and readers warn about things irrelevant here (torchvision's image.so,
    spaCy, "error loading _jsonnet"); keep them off the CLI's output, restoring the logger after."""
    logger = logging.getLogger("allennlp")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


@hookimpl
def register_task_loaders(register):
    register(AllenNLPTaskLoader)
