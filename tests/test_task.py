"""The task contract: batches follow the task's own collate and dataset, and -t options reach a task
function converted to its parameters' types."""

import pytest
import torch
from torch.utils.data import TensorDataset

import closed_form
import influence_store as ist
from tasks import bce_loss, breast_cancer_task


class Halving(TensorDataset):
    """Holds doubled inputs and halves them in __getitem__, so only that method gives the true examples."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x / 2, y


def double_inputs(split):
    x, y = split.tensors
    return 2 * x, y


def halving_collate(examples):
    x, y = torch.utils.data.default_collate(examples)
    return x / 2, y


@pytest.mark.parametrize("kind", ["collate", "subclass"])
def test_a_tensor_dataset_goes_through_the_tasks_collate_and_its_own_getitem(kind):
    """The data is stored doubled and halved by the task's collate or by the dataset's __getitem__: the scores
    are the closed form of the undoubled data (slicing .tensors directly used to skip both)."""
    reference = breast_cancer_task(n_train=120)
    if kind == "collate":
        train, test = (TensorDataset(*double_inputs(s)) for s in (reference.train, reference.test))
        task = ist.Task(reference.model, bce_loss, train, test, l2=reference.l2, collate=halving_collate)
    else:
        train, test = (Halving(*double_inputs(s)) for s in (reference.train, reference.test))
        task = ist.Task(reference.model, bce_loss, train, test, l2=reference.l2)
    assert torch.equal(task.batch("train", [3, 1])[0], reference.train.tensors[0][[3, 1]])
    scores = ist.compute_scores(task, approximator="exact").matrix()
    expected = closed_form.scores(reference)
    assert float((scores - expected).norm() / expected.norm()) < 1e-6


def test_a_plain_tensor_dataset_is_sliced_as_its_examples_would_collate():
    task = breast_cancer_task(n_train=50)
    sliced = task.batch("train", [4, 0, 7])
    collated = torch.utils.data.default_collate([task.train[i] for i in (4, 0, 7)])
    assert all(torch.equal(a, b) for a, b in zip(sliced, collated, strict=True))


TASK_FILE = '''
import influence_store as ist
from tasks import breast_cancer_task

def task(n_train: int = 455, l2: float = 0.01, shuffle: bool = False, label="plain", scale=1.0):
    seen.update(n_train=n_train, l2=l2, shuffle=shuffle, label=label, scale=scale)
    return breast_cancer_task(n_train=n_train, l2=l2)

seen = {}
'''


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "typed_task.py"
    path.write_text(TASK_FILE)
    return path


def test_task_options_are_converted_by_annotation_or_default(task_file):
    options = {"n_train": "100", "l2": "0.5", "shuffle": "yes", "label": "7", "scale": "2"}
    task = ist.load_task(f"{task_file}:task", options)
    from influence_store_task_typed_task import seen

    assert seen == {"n_train": 100, "l2": 0.5, "shuffle": True, "label": "7", "scale": 2.0}
    assert len(task.train) == 100 and task.l2 == 0.5
    ist.load_task(f"{task_file}:task", {"n_train": 60})  # a Python value is passed on as it is
    assert seen["n_train"] == 60


@pytest.mark.parametrize("name, value, expected", [("n_train", "1e2x", "int"), ("shuffle", "maybe", "bool"),
                                                   ("scale", "big", "float")])
def test_a_task_option_that_does_not_convert_is_a_one_line_error(task_file, name, value, expected):
    with pytest.raises(ist.InfluenceStoreError) as info:
        ist.load_task(f"{task_file}:task", {name: value})
    assert str(info.value) == (f"invalid value {value!r} for option {name!r} of task function 'task': "
                               f"expected {expected}")
