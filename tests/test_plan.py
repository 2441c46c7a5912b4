"""The cost plan: the budget decides blocks, caching and passes, never the scores."""

import pytest
import torch

import influence_store as ist
from influence_store.gradients import TrackedModel
from influence_store.plan import default_budget_mb
from tasks import breast_cancer_200_by_60, digits_mlp_task

LISSA = {"scale": 5.0, "batch_size": 16, "depth_iters": 20}


@pytest.fixture(scope="module")
def task():
    return breast_cancer_200_by_60()


@pytest.mark.parametrize("approximator, options", [("lissa", LISSA), ("exact", {})])
def test_two_budgets_give_identical_scores(task, approximator, options):
    roomy = ist.compute_scores(task, approximator=approximator, options=options, memory_budget_mb=4096,
                               test_chunk_size=10)
    tight = ist.compute_scores(task, approximator=approximator, options=options, memory_budget_mb=0.06,
                               test_chunk_size=10)
    # The roomy plan solves all 60 test vectors together with cached gradients; the tight one solves
    # them a chunk or two at a time and streams the training gradients once per block.
    assert roomy.plan.test_blocks == 2 and roomy.plan.train_grads_cached  # chunk 0 first, then the rest
    assert tight.plan.test_blocks > 2 and not tight.plan.train_grads_cached
    assert tight.plan.train_passes == tight.plan.test_blocks
    assert tight.model.grad_chunk_size() < len(task.train)
    assert tight.model.hvp_chunks(60, len(task.train))[1] < len(task.train)
    expected = roomy.matrix()
    torch.testing.assert_close(tight.matrix(), expected, rtol=1e-10, atol=1e-12)
    assert tight.diagnostics["train_gradient_passes"] == tight.plan.test_blocks
    assert roomy.diagnostics["train_gradient_passes"] == 1
    if approximator == "exact":  # (for lissa: one recursion per few training vectors at this budget, slow)
        torch.testing.assert_close(tight.self_influence(), roomy.self_influence(), rtol=1e-10, atol=1e-12)


def test_without_cached_gradients_the_training_set_is_read_as_often_as_the_plan_says(task):
    """Every block is then a pass over the training set: blocks are as large as memory allows (splitting
    them so that processes sharing a run get work is only free when the gradients are cached)."""
    computation = ist.compute_scores(task, approximator="exact", options={}, memory_budget_mb=0.08,
                                     test_chunk_size=5)
    assert not computation.plan.train_grads_cached and computation.chunks_per_block > 1
    computation.matrix()
    plan = computation.plan
    assert computation.diagnostics["train_gradient_passes"] == plan.test_blocks == plan.train_passes


def test_a_resumed_computation_under_another_budget_fills_the_same_chunks(task):
    first = ist.compute_scores(task, approximator="lissa", options=LISSA, memory_budget_mb=4096, test_chunk_size=7)
    done = {c.index: c for c in first.chunks()}
    later = ist.compute_scores(task, approximator="lissa", options=LISSA, memory_budget_mb=0.06,
                               test_chunk_size=first.settings["test_chunk_size"])
    resumed = list(later.chunks(skip=[0, 3, 4]))
    assert [c.index for c in resumed] == [i for i in range(first.num_chunks) if i not in (0, 3, 4)]
    for chunk in resumed:
        assert chunk.test_indices == done[chunk.index].test_indices
        torch.testing.assert_close(chunk.scores, done[chunk.index].scores, rtol=1e-10, atol=1e-12)


def test_the_plan_is_recorded_and_the_default_budget_comes_from_the_machine(task):
    computation = ist.compute_scores(task, approximator="lissa", options=LISSA)
    plan = computation.settings["plan"]
    assert plan == computation.diagnostics["plan"] == computation.plan.to_dict()
    assert plan["budget_source"] == "auto" and plan["memory_budget_mb"] == pytest.approx(default_budget_mb(), rel=0.5)
    assert plan["n_test"] == 60 and plan["test_blocks"] <= 2 and plan["train_passes"] == 1
    assert "20 steps" in computation.plan.describe()
    given = ist.compute_scores(task, approximator="lissa", options=LISSA, memory_budget_mb=3)
    assert given.plan.budget_source == "given" and given.model.memory_budget == 3 * 2**20


def test_activation_memory_is_measured_per_example():
    """The digits MLP (64 -> 32 -> 10) keeps its input, hidden pre-activation/tanh output and logits per
    example in the graph: about 64 + 2*32 + 10 floats, never the parameter count."""
    task = digits_mlp_task(n_train=50, n_test=5, epochs=1)
    model = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    floats = model.activation_floats()
    assert 64 + 32 <= floats <= 4 * (64 + 2 * 32 + 10) < model.num_params
