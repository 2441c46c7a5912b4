"""AllenNLP's own CNN, LSTM and bag-of-embeddings encoders: the same scores as SimpleInfluence, and its
train-mode (dropout) behaviour with ``model_mode="train"``.

Each BasicClassifier is trained in the test by AllenNLP's trainer on generated sentences. vmap cannot
trace the CNN (boolean masks) or the LSTM (``.item()`` on lengths, packed sequences), so these exercise the
other gradient paths: per-sample hooks for the CNN, a per-example loop for the LSTM.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import influence_store as ist
from influence_store.task import load_task

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if not os.environ.get("CI"):
        pytest.importorskip("allennlp")
    from allennlp.interpret.influence_interpreters import InfluenceInterpreter
    from allennlp.models.archival import load_archive

from test_allennlp import train_archive, write_data  # noqa: E402

pytestmark = pytest.mark.allennlp

N_TRAIN, N_TEST, DEPTH = 40, 5, 6
PATHS = {"bag": "hooks", "cnn": "hooks", "lstm": "loop"}


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"root": root, "train": write_data(root / "train.jsonl", N_TRAIN, seed=3),
            "test": write_data(root / "test.jsonl", N_TEST, seed=4, noise=0.0)}


def archive_for(sentences, encoder, dropout=None):
    name = f"{encoder}-{dropout}"
    if name not in sentences:
        sentences[name] = train_archive(sentences["root"] / name, sentences["train"], embedding_dim=4, epochs=8,
                                        encoder=encoder, dropout=dropout)
    return sentences[name]


def simple_influence(archive, sentences):
    """SimpleInfluence at a deterministic configuration (every LiSSA batch is the whole training set)."""
    loaded = load_archive(archive)
    interpreter = InfluenceInterpreter.from_archive(loaded, train_data_path=sentences["train"],
                                                    lissa_batch_size=N_TRAIN, damping=0.01, scale=20.0,
                                                    recursion_depth=DEPTH)
    outputs = interpreter.interpret_from_file(sentences["test"], k=N_TRAIN)
    position = {id(x.instance): i for i, x in enumerate(interpreter.train_instances)}
    scores = torch.zeros(len(outputs), N_TRAIN, dtype=torch.float64)
    for t, output in enumerate(outputs):
        for x in output.top_k:
            scores[t, position[id(x.instance)]] = x.score
    return scores


def ours(archive, sentences, model_mode="eval", seed=0, self_influence=True):
    task = load_task(f"allennlp:{archive}", {"train_data": sentences["train"], "test_data": sentences["test"]})
    computation = ist.compute_scores(task, "lissa", {"batch_size": N_TRAIN, "damping": 0.01, "scale": 20.0,
                                                     "depth_iters": DEPTH}, model_mode=model_mode, seed=seed,
                                     self_influence=self_influence)
    return computation.matrix(), computation, task


def assert_same_scores(mine, theirs):
    assert mine.shape == theirs.shape == (N_TEST, N_TRAIN)
    largest = float(theirs.abs().max())
    assert float((mine - theirs).abs().max()) <= 1e-5 * largest
    for t in range(N_TEST):
        assert mine[t].argsort(descending=True)[:10].tolist() == theirs[t].argsort(descending=True)[:10].tolist()


@pytest.mark.parametrize("encoder", ["bag", "cnn", "lstm"])
def test_encoder_matches_simple_influence(sentences, encoder):
    archive = archive_for(sentences, encoder)
    mine, computation, task = ours(archive, sentences)
    assert_same_scores(mine, simple_influence(archive, sentences))
    path = computation.diagnostics["grad_path"]
    assert path["path"] == PATHS[encoder], path
    if encoder != "bag":  # the HVPs' forward passes run over whole batches, not instance by instance
        assert "vmap cannot trace" in path["why"] and task.loss.path == "batched"


@pytest.mark.parametrize("encoder, dots", [("bag", "directional"), ("cnn", "directional"), ("lstm", "gradients")])
def test_scores_only_runs_match_simple_influence_whichever_way_they_score(sentences, encoder, dots):
    """A few test instances, scores only: forward mode where the encoder supports it (the LSTM's packed
    sequences have no forward-mode rule, so it falls back to per-example gradients), the same scores."""
    archive = archive_for(sentences, encoder)
    mine, computation, _ = ours(archive, sentences, self_influence=False)
    assert computation.diagnostics["training_dots"] == dots
    assert_same_scores(mine, simple_influence(archive, sentences))


def value_dropout(input, p=0.5, training=True, inplace=False):
    """Dropout whose mask is a function of the values (keeps the positive ones), so that SimpleInfluence and
    influence-store, which batch differently, draw the same masks; like dropout, only in training."""
    return input * (input.detach() > 0) / (1 - p) if training and p > 0 else input


def test_train_mode_reproduces_simple_influence_with_dropout(sentences, monkeypatch):
    """SimpleInfluence takes training gradients in train mode: model_mode="train" does too, eval does not."""
    archive = archive_for(sentences, "bag", dropout=0.4)
    monkeypatch.setattr(torch.nn.functional, "dropout", value_dropout)
    theirs = simple_influence(archive, sentences)
    train_mode, _, _ = ours(archive, sentences, model_mode="train")
    assert_same_scores(train_mode, theirs)
    eval_mode, _, _ = ours(archive, sentences)
    assert float((eval_mode - theirs).abs().max()) > 1e-2 * float(theirs.abs().max())


@pytest.mark.parametrize("encoder", ["bag", "cnn"])
def test_train_mode_with_real_dropout_repeats_for_a_seed(sentences, encoder):
    """Dropout masks come from a generator seeded with the run's seed: the same seed, the same scores."""
    archive = archive_for(sentences, encoder, dropout=0.4)
    first, _, _ = ours(archive, sentences, model_mode="train", seed=5)
    again, computation, _ = ours(archive, sentences, model_mode="train", seed=5)
    assert torch.equal(first, again)
    assert computation.settings["model_mode"] == "train"
    assert computation.diagnostics["grad_path"]["path"] == PATHS[encoder]
    evaluated, _, _ = ours(archive, sentences)
    assert not torch.allclose(first, evaluated)
    if encoder == "bag":
        other, _, _ = ours(archive, sentences, model_mode="train", seed=6)
        assert not torch.allclose(first, other)
