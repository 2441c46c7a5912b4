"""Per-example gradients and HVPs against plain autograd on a small MLP."""

import pytest
import torch
from torch.utils.data import TensorDataset

import influence_store as ist
from influence_store.gradients import TrackedModel
from tasks import ce_loss


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


class NormMLP(TinyMLP):
    """A LayerNorm between the layers: no per-sample rule covers it, so vmap serves this model."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(5)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.hidden(x))))


def mlp_task(l2=0.05, n_train=12, loss=ce_loss, model_class=TinyMLP):
    torch.manual_seed(0)
    model = model_class().double()
    x = torch.randn(n_train + 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + 4,))
    return ist.Task(model, loss, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]),
                    l2=l2)


def flat_loss(task, flat, indices):
    """Mean training loss as a function of the flat parameter vector, built without influence_store."""
    names = [n for n, _ in task.model.named_parameters()]
    shapes = [p.shape for _, p in task.model.named_parameters()]
    pieces = torch.split(flat, [s.numel() for s in shapes])
    params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes)}
    x, y = task.train.tensors
    logits = torch.func.functional_call(task.model, params, (x[indices],))
    return torch.nn.functional.cross_entropy(logits, y[indices])


def autograd_flat(task):
    return torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])


def test_hvp_equals_autograd_hessian_times_v():
    task = mlp_task()
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    theta = autograd_flat(task)
    p = theta.numel()
    vectors = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    subset = [0, 3, 4, 7, 11]

    for indices, strategy in ((None, "reverse-over-reverse"), (subset, "double-backward")):
        idx = list(range(len(task.train))) if indices is None else subset
        hessian = torch.autograd.functional.hessian(lambda t: flat_loss(task, t, idx), theta)
        expected = vectors @ (hessian + task.l2 * torch.eye(p, dtype=torch.float64)).T
        torch.testing.assert_close(tracked.hvp(vectors, indices), expected, rtol=1e-10, atol=1e-12)
        assert tracked.hvp_strategy == strategy  # the whole set (a solver) / a batch (LiSSA's step)

    hessian = torch.autograd.functional.hessian(lambda t: flat_loss(task, t, list(range(12))), theta)
    torch.testing.assert_close(tracked.dense_hessian(), hessian + task.l2 * torch.eye(p, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)


def test_hvp_is_chunked_like_one_batch():
    """A tiny memory budget splits the HVP over many chunks; the mean must not change."""
    task = mlp_task(n_train=40)
    names = [n for n, _ in task.model.named_parameters()]
    v = torch.randn(2, sum(p.numel() for p in task.model.parameters()), dtype=torch.float64)
    whole = TrackedModel(task, names).hvp(v)
    tiny = TrackedModel(task, names, memory_budget_mb=1e-4)
    assert tiny.chunk_size(tiny.num_params * 4) < 40
    torch.testing.assert_close(tiny.hvp(v), whole, rtol=1e-12, atol=1e-14)


def item_loss(model, batch):
    """A loss vmap cannot trace (it reads a Python number out of a tensor)."""
    x, y = batch
    losses = ce_loss(model, (x, y))
    return losses * (1.0 if float(losses.detach().sum().item()) >= 0 else -1.0)


def counting(loss):
    """``loss`` that counts the examples it is called on (forward passes)."""
    def counted(model, batch):
        counted.examples += len(batch[0])
        return loss(model, batch)

    counted.examples = 0
    return counted


@pytest.mark.parametrize("strategy", ["reverse-over-reverse", "double-backward", "per-vector"])
def test_repeated_whole_set_products_reuse_the_graphs_and_stay_exact(strategy, monkeypatch):
    """From the second whole-set product on (an iterative solver), no forward pass runs again, for either
    HVP strategy, and every product still equals the autograd Hessian's, whatever the piece sizes."""
    import influence_store.gradients as gradients

    counted = counting(ce_loss)
    task = mlp_task(n_train=40, loss=counted)
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    tracked.hvp_failed = set(gradients.HVP_STRATEGIES[:gradients.HVP_STRATEGIES.index(strategy)])
    # pieces of 20 (example, vector) pairs, 2 vectors each: 4 example batches, 3 vector pieces
    monkeypatch.setattr(gradients, "CPU_PIECE_BYTES", 20 * tracked.activation_floats() * 8)
    monkeypatch.setattr(gradients, "CPU_PIECE_VECTORS", 2)
    assert tracked.hvp_chunks(6, 40) == (2, 10)
    counted.examples = 0
    hessian = torch.autograd.functional.hessian(lambda t: flat_loss(task, t, list(range(40))), autograd_flat(task))
    hessian += task.l2 * torch.eye(len(hessian), dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    seen = []
    for size in (6, 6, 3, 6):  # a solver whose active set shrinks and grows
        vectors = torch.randn(size, len(hessian), dtype=torch.float64, generator=generator)
        torch.testing.assert_close(tracked.hvp(vectors), vectors @ hessian, rtol=1e-10, atol=1e-12)
        seen.append(counted.examples)
    assert tracked.hvp_strategy == strategy
    assert seen[2] == seen[1] == seen[3] > seen[0] > 0
    fresh = TrackedModel(task, tracked.names)  # no history: the same block gives the same bits
    fresh.hvp_failed = set(tracked.hvp_failed)
    assert torch.equal(fresh.hvp(vectors), tracked.hvp(vectors))


def test_vectors_are_split_into_equal_blocks(monkeypatch):
    """A call with a few more vectors than a piece has room for runs equal blocks, not a full block and a
    small one that passes every graph again for a few vectors."""
    import influence_store.gradients as gradients

    task = mlp_task(n_train=40)
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    monkeypatch.setattr(gradients, "CPU_PIECE_BYTES", 40 * tracked.activation_floats() * 8)
    monkeypatch.setattr(gradients, "CPU_PIECE_VECTORS", 4)  # room for 4 vectors by 10 examples
    assert tracked.hvp_chunks(4, 40) == (4, 10)
    assert tracked.hvp_chunks(5, 40) == (3, 10)  # 3 + 2, not 4 + 1
    assert tracked.hvp_chunks(9, 40) == (3, 10)  # 3 + 3 + 3, not 4 + 4 + 1


def test_pieces_of_a_split_set_keep_their_widest_tensor_near_a_core_cache(monkeypatch):
    """An HVP's elementwise ops stream through the widest layer's output: with the training set in several
    batches (a thread each) a piece takes few enough vectors that this tensor stays under CPU_WIDEST_BYTES.
    A set in one batch keeps its pieces."""
    import influence_store.gradients as gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).double()
    x, y = torch.randn(44, 4, dtype=torch.float64), torch.randint(0, 3, (44,))
    task = ist.Task(model, ce_loss, TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:]))
    tracked = TrackedModel(task, [n for n, _ in model.named_parameters()])
    assert tracked.widest_floats() == 64 < tracked.activation_floats()
    monkeypatch.setattr(gradients, "CPU_PIECE_BYTES", 40 * tracked.activation_floats() * 8)
    monkeypatch.setattr(gradients, "CPU_PIECE_VECTORS", 4)  # room for 4 vectors by 10 examples
    assert tracked.hvp_chunks(8, 40) == (4, 10)
    monkeypatch.setattr(gradients, "CPU_WIDEST_BYTES", 2 * 10 * 64 * 8)  # two vectors' worth of 10 examples
    assert tracked.hvp_chunks(8, 40) == (2, 10)
    assert tracked.hvp_chunks(8, 10)[0] == 4  # one batch: no thread per batch, no cap


def per_example_autograd_loop(task, split):
    x, y = getattr(task, split).tensors
    rows = []
    for i in range(len(x)):
        task.model.zero_grad()
        ce_loss(task.model, (x[i:i + 1], y[i:i + 1])).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in task.model.parameters()]))
    task.model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("model_class, path", [(TinyMLP, "hooks"), (NormMLP, "vmap")])
def test_per_example_grads_equal_autograd_loop(model_class, path):
    """Linear layers only: per-sample hooks (the faster path); a LayerNorm among them: vmap."""
    task = mlp_task(model_class=model_class)
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()], memory_budget_mb=1e-3)
    chunks = list(tracked.grad_chunks("train"))
    assert len(chunks) > 1  # the budget forces several chunks
    assert [i for idx, _ in chunks for i in idx] == list(range(len(task.train)))
    grads = torch.cat([g for _, g in chunks])
    torch.testing.assert_close(grads, per_example_autograd_loop(task, "train"), rtol=1e-10, atol=1e-12)
    assert tracked.grad_strategy == path and tracked.grad_path["path"] == path and tracked.notes == []


def centered_loss(model, batch):
    """Logits centred on the batch's mean: examples interact, so per-sample hooks see the wrong thing."""
    x, y = batch
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits - 0.5 * logits.mean(0), y, reduction="none")


def test_hooks_that_disagree_with_autograd_leave_the_model_to_vmap():
    task = mlp_task(loss=centered_loss)
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    grads = tracked.per_example_grads("test", range(len(task.test)))
    assert tracked.grad_strategy == "vmap" and "disagreed with autograd" in tracked.grad_path["why"]
    expected = []
    for i in range(len(task.test)):  # each example alone, as vmap takes it
        flat = autograd_flat(task).requires_grad_(True)
        names = [n for n, _ in task.model.named_parameters()]
        pieces = torch.split(flat, [p.numel() for p in task.model.parameters()])
        params = {n: piece.view(p.shape) for n, piece, p in zip(names, pieces, task.model.parameters())}
        x, y = task.test.tensors
        loss = centered_loss(lambda v: torch.func.functional_call(task.model, params, (v,)), (x[i:i + 1], y[i:i + 1]))
        expected.append(torch.autograd.grad(loss.sum(), flat)[0])
    torch.testing.assert_close(grads, torch.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_class, path, why", [
    (TinyMLP, "hooks", None),  # linear layers: the hooks come first, vmap is never tried
    (NormMLP, "loop", "per-sample hooks do not apply"),  # vmap fails, no per-sample rule for the LayerNorm
])
def test_untraceable_loss_gets_the_same_gradients_and_says_how(model_class, path, why):
    """A loss vmap cannot trace: per-sample hooks serve an all-Linear model (the loop for others; hooks as
    the fallback for convolutions: test_per_sample.py)."""
    task = mlp_task(loss=item_loss, model_class=model_class)
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    grads = tracked.per_example_grads("test", range(len(task.test)))
    assert tracked.grad_strategy == path
    if why is None:
        assert tracked.notes == []
    else:
        assert "vmap cannot trace" in tracked.notes[0] and why in tracked.notes[0]
    torch.testing.assert_close(grads, per_example_autograd_loop(task, "test"), rtol=1e-10, atol=1e-12)


def test_tracked_subset_and_unused_parameters_get_zero_gradients():
    """Gradients cover only the tracked names, in their order; a parameter the loss never uses is zeros."""
    task = mlp_task()
    task.model.unused = torch.nn.Linear(2, 2).double()
    tracked = TrackedModel(task, ["out.weight", "unused.bias"])
    grads = tracked.per_example_grads("train", [0, 1, 2])
    full = per_example_autograd_loop_named(task, [0, 1, 2])
    torch.testing.assert_close(grads[:, :15], full["out.weight"], rtol=1e-10, atol=1e-12)
    assert torch.equal(grads[:, 15:], torch.zeros(3, 2, dtype=torch.float64))
    torch.testing.assert_close(tracked._single_grad(tracked.batch("train", [0]))[:15], full["out.weight"][0])


def per_example_autograd_loop_named(task, indices):
    x, y = task.train.tensors
    rows = []
    for i in indices:
        (g,) = torch.autograd.grad(ce_loss(task.model, (x[i:i + 1], y[i:i + 1])).sum(), task.model.out.weight)
        rows.append(g.reshape(-1))
    return {"out.weight": torch.stack(rows)}


def test_model_is_used_in_eval_mode_and_restored():
    """Dropout must be off while computing gradients, and the user's training flag comes back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).double()
    model.train()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    task = ist.Task(model, ce_loss, TensorDataset(x, y), TensorDataset(x, y))
    tracked = TrackedModel(task, [n for n, _ in model.named_parameters()])
    first = tracked.per_example_grads("train", range(6))
    torch.testing.assert_close(tracked.per_example_grads("train", range(6)), first, rtol=0, atol=0)
    assert model.training


@pytest.mark.parametrize("missing", [["nope.weight"], []])
def test_tracked_names_are_checked(missing):
    task = mlp_task()
    with pytest.raises(ist.InfluenceStoreError):
        TrackedModel(task, missing)


class TinyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                                      batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def test_attention_models_get_hvps_equal_to_the_autograd_hessian():
    """The fused attention kernels have no second derivative: HVPs build their graphs with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = TinyAttention().double().eval()
    x, y = torch.randn(14, 5, 8, dtype=torch.float64), torch.randint(0, 3, (14,))
    task = ist.Task(model, ce_loss, TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:]), l2=0.01)
    tracked = TrackedModel(task, [n for n, _ in model.named_parameters()])
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])

    def mean_loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, [s.numel() for s in shapes]), shapes)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x[:10],)), y[:10])

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(mean_loss, autograd_flat(task))
    hessian += task.l2 * torch.eye(len(hessian), dtype=torch.float64)
    vectors = torch.randn(3, len(hessian), dtype=torch.float64)
    torch.testing.assert_close(tracked.hvp(vectors), vectors @ hessian, rtol=1e-9, atol=1e-11)


def test_whole_set_products_run_one_thread_per_batch_with_the_serial_bits(monkeypatch):
    """Whole-set products build every example batch's graph, then run them one per thread (one intra-op thread
    each, restored after): the first product too, once one vector has settled the strategy, and a
    solver's later ones from kept graphs. Each gives exactly the one-thread serial loop's sums, which equal
    the autograd Hessian's."""
    import threading

    import influence_store.gradients as gradients
    import influence_store.pieces as pieces

    task = mlp_task(n_train=40)
    names = [n for n, _ in task.model.named_parameters()]
    tracked = TrackedModel(task, names)
    monkeypatch.setattr(gradients, "CPU_PIECE_BYTES", 20 * tracked.activation_floats() * 8)
    monkeypatch.setattr(gradients, "CPU_PIECE_VECTORS", 2)  # 4 example batches
    vectors = torch.randn(6, tracked.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no threads pay: the serial loop
    try:
        serial = TrackedModel(task, names).hvp(vectors)
    finally:
        torch.set_num_threads(threads)
    workers, real = [], pieces.by_rows

    def spy(*args):
        workers.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(pieces, "by_rows", spy)
    torch.set_num_threads(2)
    try:
        first = tracked.hvp(vectors)
        first_workers, workers[:] = list(workers), []
        kept = tracked.hvp(vectors)  # the second keeps the graphs
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(first_workers) == 4 and threading.current_thread().name not in first_workers
    assert len(workers) == 4 and threading.current_thread().name not in workers
    assert first.equal(serial) and kept.equal(serial)
    hessian = torch.autograd.functional.hessian(lambda t: flat_loss(task, t, list(range(40))), autograd_flat(task))
    hessian += task.l2 * torch.eye(len(hessian), dtype=torch.float64)
    torch.testing.assert_close(kept, vectors @ hessian, rtol=1e-10, atol=1e-12)


class _CheckedMul(torch.autograd.Function):
    """``a * b`` whose backward reads a Python number from its input, which vmap refuses."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad_output):
        a, b = ctx.saved_tensors
        if float(grad_output.abs().sum().item()) < 0:  # never true: only here to call .item()
            raise AssertionError
        return grad_output * b, grad_output * a


class _OldStyleTanh(torch.autograd.Function):
    """tanh as an autograd.Function without ``setup_context`` (torch.func cannot transform its forward); with
    ``checked`` its backward multiplies through ``_CheckedMul``, so a vmapped second backward pass fails."""

    checked = False

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        slope = 1 - torch.tanh(x) ** 2
        return _CheckedMul.apply(grad_output, slope) if _OldStyleTanh.checked else grad_output * slope


@pytest.mark.parametrize("checked, strategy", [(False, "double-backward"), (True, "per-vector")])
def test_first_threaded_product_settles_the_hvp_strategy(monkeypatch, checked, strategy):
    """The first whole-set product settles the HVP strategy on one vector before its batches go to threads.
    A model torch.func cannot transform gets double backward with its vectors vmapped over the second backward
    pass (only that pass is vmapped); where that pass itself fails, one vector at a time. Both give the autograd
    Hessian."""
    import influence_store.gradients as gradients

    monkeypatch.setattr(_OldStyleTanh, "checked", checked)
    task = mlp_task(n_train=40)
    task.model.forward = lambda x: task.model.out(_OldStyleTanh.apply(task.model.hidden(x)))
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    monkeypatch.setattr(gradients, "CPU_PIECE_BYTES", 20 * tracked.activation_floats() * 8)
    monkeypatch.setattr(gradients, "CPU_PIECE_VECTORS", 2)  # 4 example batches
    vectors = torch.randn(6, tracked.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hessian = torch.autograd.functional.hessian(lambda t: flat_loss(task, t, list(range(40))), autograd_flat(task))
    hessian += task.l2 * torch.eye(len(hessian), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        product = tracked.hvp(vectors)
    finally:
        torch.set_num_threads(threads)
    assert tracked.hvp_strategy == strategy and "reverse-over-reverse failed" in tracked.notes[0]
    assert any("double-backward failed" in note for note in tracked.notes) == checked
    torch.testing.assert_close(product, vectors @ hessian, rtol=1e-10, atol=1e-12)


def _threaded_sum_of_doubled_and_tripled(vectors):
    from influence_store.pieces import kept_sums_in_threads

    return kept_sums_in_threads({0: lambda block: block * 2, 1: lambda block: block * 3}, [0, 1], vectors, 2,
                                into=torch.zeros_like(vectors))


def test_a_forked_child_gets_its_own_hvp_threads():
    """A child forked after the parent's threaded products (e.g. a worker process) must not wait on threads
    that only the parent has."""
    import multiprocessing

    vectors = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(_threaded_sum_of_doubled_and_tripled(vectors), vectors * 5)  # the parent's pool
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_threaded_sum_of_doubled_and_tripled, (vectors,)).get(timeout=60)
    torch.testing.assert_close(child, vectors * 5)
