"""``model_mode="train"`` (dropout on): each example's mask depends on its position and the seed only, so
scores do not depend on the budget or the chunking; batch normalization is refused."""

import pytest
import torch
from torch.utils.data import TensorDataset

import influence_store as ist
from influence_store.gradients import TrackedModel


def ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def task_with(*layers, n_train=50):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), *layers, torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x, y = torch.randn(n_train + 6, 6, dtype=torch.float64), torch.randint(0, 3, (n_train + 6,))
    return ist.Task(model, ce, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]),
                    l2=0.01)


def test_train_mode_scores_do_not_depend_on_the_budget_or_the_chunking():
    task = task_with(torch.nn.Dropout(0.3))
    options = {"damping": 0.05}
    roomy = ist.compute_scores(task, "exact", options, model_mode="train", memory_budget_mb=1000)
    tight = ist.compute_scores(task, "exact", options, model_mode="train", memory_budget_mb=0.05, test_chunk_size=2)
    assert tight.model.grad_chunk_size() < 16 < roomy.model.grad_chunk_size()
    torch.testing.assert_close(tight.matrix(), roomy.matrix(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tight.self_influence(), roomy.self_influence(), rtol=1e-10, atol=1e-12)
    evaluated = ist.compute_scores(task, "exact", options, memory_budget_mb=1000).matrix()
    assert not torch.allclose(roomy.matrix(), evaluated)  # dropout was on


def test_a_train_mode_gradient_is_the_same_whichever_examples_are_asked_with_it():
    task = task_with(torch.nn.Dropout(0.3))
    model = TrackedModel(task, [n for n, _ in task.model.named_parameters()], model_mode="train")
    whole = model.per_example_grads("train", range(50))
    assert torch.equal(model.per_example_grads("train", [7, 3, 40]), whole[[7, 3, 40]])
    assert torch.equal(model.per_example_grads("train", range(5, 37)), whole[5:37])


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm1d(12), torch.nn.LazyBatchNorm1d()])
def test_train_mode_refuses_batch_normalization_and_leaves_the_model_alone(norm):
    task = task_with(norm)
    task.model(task.train.tensors[0][:4])  # materializes the lazy layer
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    with pytest.raises(ist.InfluenceStoreError, match="cannot be used with batch normalization .* model_mode=.eval."):
        ist.compute_scores(task, "exact", model_mode="train")
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
