"""Freezing policies choose names, never touch the model, and scores follow the chosen parameters."""

import pytest
import torch
from torch.utils.data import TensorDataset

import influence_store as ist
from influence_store.freezing import tracked_parameters
from tasks import DigitsMLP, ce_loss, digits_mlp_task


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 6)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
        self.head = torch.nn.Linear(6, 3)
        self.head_norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.head_norm(self.head(torch.tanh(self.blocks(self.embed(x)))))


def snapshot(model):
    return ({n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}, model.training)


def assert_unchanged(model, before):
    params, training = before
    assert model.training == training
    for name, p in model.named_parameters():
        assert p.requires_grad == params[name][0], name
        assert torch.equal(p.detach(), params[name][1]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("policy, options", [
    ("all", None), ("regex", {"patterns": ["embed", r"blocks\.0"]}), ("last-layer", None),
    ("modules", {"names": ["blocks"]}),
])
def test_policies_and_scoring_never_mutate_the_model(policy, options):
    torch.manual_seed(0)
    model = Encoder().double()
    model.embed.bias.requires_grad_(False)
    model.train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    task = ist.Task(model, ce_loss, TensorDataset(x[:7], y[:7]), TensorDataset(x[7:], y[7:]), l2=0.1)
    before = snapshot(model)
    tracked_parameters(model, policy, options)
    assert_unchanged(model, before)
    ist.compute_scores(task, approximator="lissa", freeze=policy, freeze_options=options,
                       options={"depth_iters": 3}).matrix()
    assert_unchanged(model, before)


def test_all_tracks_what_requires_grad():
    model = Encoder()
    model.head.requires_grad_(False)
    assert tracked_parameters(model, "all") == [n for n, _ in model.named_parameters() if not n.startswith("head.")]


def test_regex_freezes_with_re_match_semantics():
    model = Encoder()
    # re.match anchors at the start: "weight" matches no name (an error, not a silent no-op), ".*weight" every weight
    with pytest.raises(ist.InfluenceStoreError, match="freezing pattern 'weight' matches no parameter name"):
        tracked_parameters(model, "regex", {"patterns": ["weight"]})
    assert tracked_parameters(model, "regex", {"patterns": [".*weight"]}) == [
        "embed.bias", "blocks.0.bias", "blocks.2.bias", "head.bias", "head_norm.bias"]
    # a prefix match is enough (no full match needed), and any one pattern freezes
    assert tracked_parameters(model, "regex", {"patterns": ["head", "blocks.2"]}) == [
        "embed.weight", "embed.bias", "blocks.0.weight", "blocks.0.bias"]


def test_last_layer_is_the_last_module_with_trainable_parameters():
    model = Encoder()
    assert tracked_parameters(model, "last-layer") == ["head_norm.weight", "head_norm.bias"]
    model.head_norm.requires_grad_(False)
    assert tracked_parameters(model, "last-layer") == ["head.weight", "head.bias"]
    assert tracked_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)),
                              "last-layer") == ["2.weight", "2.bias"]


def test_modules_tracks_the_named_subtrees_only():
    model = Encoder()
    assert tracked_parameters(model, "modules", {"names": ["blocks.2", "embed"]}) == [
        "embed.weight", "embed.bias", "blocks.2.weight", "blocks.2.bias"]
    # "head" is not a prefix match for "head_norm": whole module names only
    assert tracked_parameters(model, "modules", {"names": ["head"]}) == ["head.weight", "head.bias"]
    with pytest.raises(ist.InfluenceStoreError, match="no module named 'decoder'; modules: embed, blocks"):
        tracked_parameters(model, "modules", {"names": ["decoder"]})


def test_zero_tracked_parameters_is_an_error():
    with pytest.raises(ist.InfluenceStoreError, match="zero tracked parameters"):
        tracked_parameters(Encoder(), "regex", {"patterns": [".*"]})


@pytest.mark.parametrize("policy", ["all", "last-layer"])
def test_a_fully_frozen_model_is_told_so_not_to_loosen_the_policy(policy):
    model = Encoder().requires_grad_(False)
    with pytest.raises(ist.InfluenceStoreError) as info:
        tracked_parameters(model, policy)
    assert str(info.value) == ("the model has no parameter with requires_grad=True; set requires_grad=True on the "
                               "parameters to compute influence over")


def test_modules_without_names_says_how_to_give_them():
    from plugins.freezing import Modules

    assert "-f names encoder" in Modules.__doc__  # the CLI's help text: freezing options are -f, not -o
    with pytest.raises(ist.InfluenceStoreError) as info:
        tracked_parameters(Encoder(), "modules", {})
    assert str(info.value) == ("freezing policy 'modules' needs at least one module name, e.g. "
                               'freeze_options={"names": ["classifier"]}')


class Tied(torch.nn.Module):
    """A decoder sharing the embedding's weight: named_parameters() lists that tensor once, as emb.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.mix = torch.nn.Linear(3, 3)
        self.dec = torch.nn.Linear(3, 5, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, tokens):
        return self.dec(torch.tanh(self.mix(self.emb(tokens).mean(1))))


def test_a_policy_naming_a_tied_parameter_by_another_name_tracks_it_once():
    """last-layer picks dec.weight, the second name of emb.weight: it tracks that tensor, and the scores are
    those computed over it by name."""
    torch.manual_seed(0)
    model = Tied().double()
    assert "dec.weight" not in dict(model.named_parameters())
    assert tracked_parameters(model, "last-layer") == ["emb.weight"]
    assert tracked_parameters(model, "regex", {"patterns": ["mix"]}) == ["emb.weight"]
    x, y = torch.randint(0, 5, (12, 4)), torch.randint(0, 5, (12,))
    task = ist.Task(model, ce_loss, TensorDataset(x[:9], y[:9]), TensorDataset(x[9:], y[9:]), l2=0.1)
    last = ist.compute_scores(task, approximator="exact", freeze="last-layer").matrix()
    by_name = ist.compute_scores(task, approximator="exact", freeze="modules", freeze_options={"names": ["emb"]})
    assert torch.equal(last, by_name.matrix())


def test_unknown_policy_lists_the_available_ones():
    with pytest.raises(ist.InfluenceStoreError, match="unknown freezing policy 'lastlayer'; available: all, "
                                                      "last-layer, modules, regex"):
        tracked_parameters(Encoder(), "lastlayer")


def test_last_layer_scores_equal_an_independent_computation_over_those_parameters():
    """Exact scores with --freeze last-layer on a digits MLP: the Hessian and gradients over the output
    layer only, built here with plain autograd."""
    task = digits_mlp_task(n_train=80, n_test=6, epochs=30)
    scores = ist.compute_scores(task, approximator="exact", freeze="last-layer").matrix()
    model = task.model
    assert isinstance(model, DigitsMLP)
    shapes = [model.out.weight.shape, model.out.bias.shape]

    def loss_of(theta, x, y):
        weight, bias = torch.split(theta, [shapes[0].numel(), shapes[1].numel()])
        logits = torch.tanh(model.hidden(x)) @ weight.view(shapes[0]).T + bias
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    theta = torch.cat([model.out.weight.detach().reshape(-1), model.out.bias.detach()]).double()
    model.double()
    (xtr, ytr), (xte, yte) = (tuple(t.double() if t.is_floating_point() else t for t in split.tensors)
                              for split in (task.train, task.test))
    hessian = torch.autograd.functional.hessian(lambda th: loss_of(th, xtr, ytr).mean(), theta)
    hessian += task.l2 * torch.eye(len(theta), dtype=torch.float64)
    grad = lambda x, y: torch.stack([torch.autograd.functional.jacobian(  # noqa: E731
        lambda th: loss_of(th, x[i:i + 1], y[i:i + 1]).sum(), theta) for i in range(len(x))])
    expected = grad(xte, yte) @ torch.linalg.solve(hessian, grad(xtr, ytr).T)
    assert float((scores - expected).norm() / expected.norm()) < 1e-5  # the model computes in float32
