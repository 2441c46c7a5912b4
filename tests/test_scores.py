"""Scores: sign convention, self-influence, and invariance to test order, chunking and memory budget."""

import copy

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import closed_form
import influence_store as ist
from tasks import breast_cancer_200_by_60, bce_loss, breast_cancer_data, breast_cancer_task, fit_logistic

LISSA = {"scale": 5.0, "batch_size": 16, "depth_iters": 20}


@pytest.fixture(scope="module")
def task():
    return breast_cancer_200_by_60()


def scores_with_extra_training_example(t, label):
    """Exact scores of test point t after retraining with one more training example: x_t with ``label``."""
    xtr, ytr, xte, yte = breast_cancer_data(200)
    x = torch.cat([xtr, xte[t:t + 1]])
    y = torch.cat([ytr, torch.tensor([label], dtype=ytr.dtype)])
    task = ist.Task(fit_logistic(x, y), bce_loss, TensorDataset(x, y), TensorDataset(xte[t:t + 1], yte[t:t + 1]),
                    l2=0.01)
    return ist.compute_scores(task, approximator="exact").matrix()[0]


def test_duplicate_helps_and_flipped_label_hurts():
    """A training copy of a test point is its most helpful training example; the same input with the
    label flipped, its most harmful. Checked on the test points the model is least sure about (there
    both copies have large gradients; a point fit with confidence has a near-zero one)."""
    xtr, ytr, xte, yte = breast_cancer_data(200)
    probability = torch.sigmoid(fit_logistic(xtr, ytr)(xte).squeeze(-1)).detach()
    for t in (probability - 0.5).abs().argsort()[:3].tolist():
        duplicate = scores_with_extra_training_example(t, float(yte[t]))
        assert duplicate[-1] > 0 and duplicate.argmax() == len(duplicate) - 1
        flipped = scores_with_extra_training_example(t, 1 - float(yte[t]))
        assert flipped[-1] < 0 and flipped.argmin() == len(flipped) - 1


def test_self_influence_is_the_diagonal_and_nonnegative_for_a_convex_model(task):
    computation = ist.compute_scores(task, approximator="exact", memory_budget_mb=0.01)
    self_influence = computation.self_influence()
    xtr, ytr = task.train.tensors
    g = closed_form.grads(task.model, xtr, ytr)
    expected = (g * torch.linalg.solve(closed_form.hessian(task.model, xtr, task.l2), g.T).T).sum(1)
    torch.testing.assert_close(self_influence, expected, rtol=1e-8, atol=1e-12)
    assert (self_influence >= 0).all()


def permuted(task, order):
    return ist.Task(task.model, task.loss, task.train, Subset(task.test, order), l2=task.l2)


@pytest.mark.parametrize("approximator, options", [("lissa", LISSA), ("exact", {})])
def test_scores_do_not_depend_on_test_order_or_chunking(task, approximator, options):
    reference = ist.compute_scores(task, approximator=approximator, options=options).matrix()
    order = torch.randperm(len(task.test), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = ist.compute_scores(permuted(task, order), approximator=approximator, options=options,
                                  test_chunk_size=7).matrix()
    torch.testing.assert_close(shuffled, reference[order], rtol=1e-9, atol=1e-12)
    for chunk_size in (1, 50):
        chunked = ist.compute_scores(task, approximator=approximator, options=options, test_chunk_size=chunk_size)
        torch.testing.assert_close(chunked.matrix(), reference, rtol=1e-9, atol=1e-12)


def test_chunks_cover_the_test_set_once_and_skip_resumes(task):
    computation = ist.compute_scores(task, approximator="lissa", options=LISSA, test_chunk_size=25)
    assert computation.num_chunks == 3  # 60 test examples: 25 + 25 + 10
    chunks = list(computation.chunks())
    assert [i for c in chunks for i in c.test_indices] == list(range(len(task.test)))
    assert all(c.scores.shape == (len(c.test_indices), len(task.train)) and c.scores.dtype == torch.float64
               for c in chunks)
    resumed = list(computation.chunks(skip=[0, 2]))
    assert [c.index for c in resumed] == [i for i in range(computation.num_chunks) if i not in (0, 2)]
    for c in resumed:
        torch.testing.assert_close(c.scores, chunks[c.index].scores, rtol=0, atol=0)


def test_a_tiny_memory_budget_gives_the_same_scores(task):
    roomy = ist.compute_scores(task, approximator="lissa", options=LISSA)
    tight = ist.compute_scores(task, approximator="lissa", options=LISSA, memory_budget_mb=0.02, test_chunk_size=20)
    assert tight.model.chunk_size(tight.model.num_params) < len(task.train)  # gradients come in several chunks
    torch.testing.assert_close(tight.matrix(), roomy.matrix(), rtol=1e-9, atol=1e-12)
    assert tight._train_grads is None  # over budget: recomputed per chunk, not cached


def test_settings_record_what_the_scores_mean(task):
    computation = ist.compute_scores(task, approximator="lissa", seed=5)
    settings = computation.settings
    assert settings["effective_damping"] == pytest.approx(3e-3 * 1e4)
    assert settings["options"]["scale"] == 1e4 and settings["seed"] == 5
    assert settings["num_params"] == 31 and settings["tracked_parameters"] == ["weight", "bias"]
    assert settings["sign_convention"] == ist.SIGN_CONVENTION and "positive = helpful" in ist.SIGN_CONVENTION
    torch.testing.assert_close(computation.train_losses, torch.nn.functional.binary_cross_entropy_with_logits(
        task.model(task.train.tensors[0]).squeeze(-1), task.train.tensors[1], reduction="none").detach())


def test_float32_model_and_float64_request(task):
    """A float64 computation of a float32 model matches the closed form; the user's model stays float32."""
    model32 = fit_logistic(*task.train.tensors).float()
    x, y = (t.float() for t in task.train.tensors)
    xte, yte = (t.float() for t in task.test.tensors)
    task32 = ist.Task(model32, bce_loss, TensorDataset(x, y), TensorDataset(xte, yte), l2=task.l2)
    scores = ist.compute_scores(task32, approximator="exact", dtype="float64").matrix()
    assert scores.dtype == torch.float64 and model32.weight.dtype == torch.float32
    reference = closed_form.scores(ist.Task(copy.deepcopy(model32).double(), bce_loss, task.train, task.test,
                                            l2=task.l2))
    assert float((scores - reference).norm() / reference.norm()) < 1e-5


def test_a_resumed_block_gives_the_same_bits_as_the_whole_block():
    """Chunks solved together share one batched inverse-HVP; a block resumed after some of its chunks were
    stored is solved whole again, so the missing chunks are bit-identical to an uninterrupted run."""
    task = breast_cancer_task(n_train=100)  # where solving 2 test examples instead of 4 changes the last bits
    task.test = Subset(task.test, range(12))
    computation = ist.compute_scores(task, "lissa", {"depth_iters": 5, "scale": 10, "damping": 0.01},
                                     test_chunk_size=2)
    grid = [computation.chunk_grid(i) for i in range(computation.num_chunks)]
    partial = [i for i in range(computation.num_chunks) if grid[i][0] < i]  # a block's later chunks
    assert partial, grid
    whole = {c.index: c.scores for c in computation.chunks()}
    for c in computation.chunks(skip=[grid[i][0] for i in partial]):
        assert torch.equal(c.scores, whole[c.index]), c.index
