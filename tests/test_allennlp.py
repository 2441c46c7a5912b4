"""AllenNLP models: score parity with SimpleInfluence, convergence to exact, the archive through the CLI, bad input.

A small BasicClassifier (bag of embeddings, no dropout) is trained in the test by AllenNLP's own
trainer on offline sentiment-like JSONL, and its model.tar.gz is what every test loads. Needs the
optional install (``pip install --no-deps -r requirements-allennlp.txt``); CI installs it, so there a
missing AllenNLP fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr

import influence_store as ist
import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.errors import InfluenceStoreError
from influence_store.task import content_hash, load_task

with warnings.catch_warnings():  # torchvision's image.so warning, spaCy's deprecations
    warnings.simplefilter("ignore")
    if not os.environ.get("CI"):
        pytest.importorskip("allennlp")
    from allennlp.common import Params
    from allennlp.commands.train import train_model
    from allennlp.data import DatasetReader
    from allennlp.data.dataset_readers import TextClassificationJsonReader
    from allennlp.data.fields import MetadataField
    from allennlp.data.tokenizers import WhitespaceTokenizer
    from allennlp.interpret.influence_interpreters import InfluenceInterpreter
    from allennlp.models.archival import load_archive

from influence_store.plugins.allennlp_tasks import task_from_model  # noqa: E402

pytestmark = pytest.mark.allennlp

N_TRAIN, N_TEST = 80, 12
# SimpleInfluence made deterministic: every LiSSA batch is the whole training set, a fixed depth.
DETERMINISTIC = {"damping": 0.01, "scale": 20.0, "depth": 30}


@DatasetReader.register("influence_store_test_jsonl", exist_ok=True)
class JsonlWithIds(TextClassificationJsonReader):
    """TextClassificationJsonReader that also keeps each line's "id" in a metadata field."""

    def _read(self, file_path):
        with open(file_path) as lines:
            for line in lines:
                item = json.loads(line)
                instance = self.text_to_instance(item["text"], item.get("label"))
                instance.add_field("metadata", MetadataField({"id": item["id"]}))
                yield instance


def write_data(path, n, seed, noise=0.1, labels=True):
    """``n`` distinct sentences: "good*" words mean pos, "bad*" neg, "the*" nothing; ``noise`` flips labels."""
    rng = random.Random(seed)
    words = {True: [f"good{i}" for i in range(12)], False: [f"bad{i}" for i in range(12)]}
    neutral = [f"the{i}" for i in range(10)]
    seen = set()
    with open(path, "w") as out:
        while len(seen) < n:
            label = rng.random() < 0.5
            tokens = [rng.choice(words[label]) for _ in range(rng.randint(1, 3))]
            tokens += [rng.choice(neutral) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.3:
                tokens.append(rng.choice(words[not label]))
            rng.shuffle(tokens)
            text = " ".join(tokens)
            if text in seen:
                continue
            seen.add(text)
            item = {"id": f"s{seed}-{len(seen)}", "text": text}
            if labels:
                item["label"] = "pos" if label != (rng.random() < noise) else "neg"
            out.write(json.dumps(item) + "\n")
    return str(path)


ENCODERS = {  # AllenNLP's own seq2vec encoders, sized for a few seconds of training
    "bag": lambda dim: {"type": "bag_of_embeddings", "embedding_dim": dim, "averaged": True},
    "cnn": lambda dim: {"type": "cnn", "embedding_dim": dim, "num_filters": 3, "ngram_filter_sizes": [1, 2]},
    "lstm": lambda dim: {"type": "lstm", "input_size": dim, "hidden_size": 4},
}


def train_archive(directory, train_path, embedding_dim=6, epochs=15, encoder="bag", dropout=None,
                  reader="influence_store_test_jsonl"):
    """Train a BasicClassifier with `allennlp train`'s own code path; returns its model.tar.gz."""
    model = {"type": "basic_classifier",
             "text_field_embedder": {"token_embedders": {"tokens": {"type": "embedding",
                                                                    "embedding_dim": embedding_dim}}},
             "seq2vec_encoder": ENCODERS[encoder](embedding_dim)}
    if dropout is not None:
        model["dropout"] = dropout
    config = {
        # Every sentence has >= 2 tokens: the CNN's widest filter always sees a real token.
        "dataset_reader": {"type": reader, "tokenizer": {"type": "whitespace"},
                           "token_indexers": {"tokens": {"type": "single_id", "token_min_padding_length": 2}}},
        "train_data_path": str(train_path),
        "model": model,
        "data_loader": {"batch_size": 16, "shuffle": True},
        "trainer": {"optimizer": {"type": "adam", "lr": 0.05}, "num_epochs": epochs, "cuda_device": -1},
        "random_seed": 1, "numpy_seed": 1, "pytorch_seed": 1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_model(Params(config), str(directory), force=True)
    return str(directory / "model.tar.gz")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("allennlp")
    train = write_data(root / "train.jsonl", N_TRAIN, seed=0)
    test = write_data(root / "test.jsonl", N_TEST, seed=1, noise=0.0)
    return {"root": root, "train": train, "test": test, "archive": train_archive(root / "serialization", train)}


def simple_influence(data, dtype=torch.float32, params_to_freeze=None, **lissa):
    """AllenNLP's SimpleInfluence on a freshly loaded archive: full [n_test, n_train] scores and each
    test instance's top-k training positions in AllenNLP's order."""
    archive = load_archive(data["archive"])
    archive.model.to(dtype)
    interpreter = InfluenceInterpreter.from_archive(archive, train_data_path=data["train"],
                                               params_to_freeze=params_to_freeze, **lissa)
    outputs = interpreter.interpret_from_file(data["test"], k=N_TRAIN)
    position = {id(x.instance): i for i, x in enumerate(interpreter.train_instances)}
    scores = torch.zeros(len(outputs), N_TRAIN, dtype=torch.float64)
    order = []
    for t, output in enumerate(outputs):
        order.append([position[id(x.instance)] for x in output.top_k])
        for x in output.top_k:
            scores[t, position[id(x.instance)]] = x.score
    return scores, order


def deterministic_lissa():
    d = DETERMINISTIC
    ours = {"batch_size": N_TRAIN, "damping": d["damping"], "scale": d["scale"], "depth_iters": d["depth"]}
    theirs = {"lissa_batch_size": N_TRAIN, "damping": d["damping"], "scale": d["scale"], "recursion_depth": d["depth"]}
    return ours, theirs


def load(data, **options):
    return load_task(f"allennlp:{data['archive']}", {"train_data": data["train"], "test_data": data["test"], **options})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lissa_matches_simple_influence(data, dtype):
    """Same archive, data and LiSSA settings: every score equal to 1e-5 relative, same order of the most
    helpful examples. float32 is what both run by default: there scores are compared relative to
    the largest one (the smallest are float32 rounding of near-cancelling sums)."""
    ours_options, theirs_options = deterministic_lissa()
    ours = ist.compute_scores(load(data), "lissa", ours_options, dtype=dtype).matrix()
    theirs, their_order = simple_influence(data, getattr(torch, dtype), **theirs_options)
    assert ours.shape == (N_TEST, N_TRAIN)
    if dtype == "float64":
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0.0)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    assert (ours > 0).any() and (ours < 0).any()  # both signs occur, and agree
    for t in range(N_TEST):
        assert ours[t].argsort(descending=True)[:10].tolist() == their_order[t][:10]


def test_converged_lissa_agrees_with_exact_at_the_same_ridge(data):
    """Stochastic LiSSA (two batches per epoch) with scale=auto, iterated until its window means settle,
    ranks like exact at the run's effective ridge (damping * scale). SimpleInfluence's defaults (ridge
    30, two steps here) are only reported: they are close to a plain gradient dot product."""
    task = load(data)
    lissa = ist.compute_scores(task, "lissa", {"scale": "auto", "damping": 0.1, "batch_size": N_TRAIN // 2})
    converged = lissa.matrix()
    assert lissa.approximator.diagnostics["converged"] is True
    ridge = lissa.settings["effective_damping"]
    exact = ist.compute_scores(task, "exact", {"damping": ridge}).matrix()
    for t in range(N_TEST):
        assert spearmanr(converged[t], exact[t]).statistic >= 0.99, t
    defaults, _ = simple_influence(data)
    exact_30 = ist.compute_scores(task, "exact", {"damping": 30.0}).matrix()
    agreement = torch.tensor([spearmanr(defaults[t], exact_30[t]).statistic for t in range(N_TEST)])
    print(f"SimpleInfluence defaults vs exact at ridge 30: Spearman median {agreement.median():.3f}, "
          f"min {agreement.min():.3f}")


def test_archive_through_the_cli_into_the_store(data):
    """`run allennlp:ARCHIVE` with --freeze regex (params_to_freeze) stores SimpleInfluence's scores,
    keyed by the readers' metadata ids."""
    ours_options, theirs_options = deterministic_lissa()
    options = [arg for key, value in ours_options.items() for arg in ("-o", key, str(value))]
    runner = CliRunner()
    result = runner.invoke(cli, ["run", f"allennlp:{data['archive']}", "--train-data", data["train"],
                                 "--test-data", data["test"], "-a", "lissa", *options,
                                 "--freeze", "regex", "-f", "patterns", "_text_field_embedder.*", "--json"])
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.output.strip().splitlines()[-1])["run_id"]
    shown = json.loads(runner.invoke(cli, ["runs", "show", str(run_id), "--json"]).output)
    assert shown["settings"]["tracked_parameters"] == ["_classification_layer.weight", "_classification_layer.bias"]

    theirs, their_order = simple_influence(data, params_to_freeze=["_text_field_embedder.*"], **theirs_options)
    test_ids = [json.loads(line)["id"] for line in open(data["test"])]
    train_ids = [json.loads(line)["id"] for line in open(data["train"])]
    for t in (0, 5):
        stored = json.loads(runner.invoke(cli, ["scores", str(run_id), "--test", test_ids[t], "--top",
                                                str(N_TRAIN), "--json"]).output)
        helpful = stored["helpful"]
        assert [row["key"] for row in helpful[:10]] == [train_ids[i] for i in their_order[t][:10]]
        by_key = {row["key"]: row["score"] for row in helpful}
        stored_scores = torch.tensor([by_key[k] for k in train_ids], dtype=torch.float64)
        torch.testing.assert_close(stored_scores, theirs[t], rtol=1e-5, atol=1e-5 * float(theirs[t].abs().max()))


def test_live_model_keys_hashes_and_untouched_metrics(data):
    """task_from_model: position keys without an id, stable content hashes, labels; the model's
    accuracy metric neither breaks vmap nor counts influence passes; the per-instance fallback agrees."""
    archive = load_archive(data["archive"])
    plain = TextClassificationJsonReader(tokenizer=WhitespaceTokenizer())
    task = task_from_model(archive.model, plain, data["train"], data["test"])
    assert task.keys("train") == [str(i) for i in range(N_TRAIN)]
    first = json.loads(open(data["train"]).readline())
    assert task.label_of(task.train[0]) == first["label"]
    assert task.describe(task.train[0])["tokens"] == first["text"].split()
    again = task_from_model(archive.model, plain, data["train"], data["test"])
    hashes = [content_hash(task.describe(e)) for e in task.train]
    assert hashes == [content_hash(again.describe(e)) for e in again.train]

    accuracy = archive.model._accuracy
    before = (accuracy.correct_count, accuracy.total_count)
    computation = ist.compute_scores(task, "lissa", {"depth_iters": 3})
    batched = computation.matrix()
    assert computation.model.grad_strategy == "hooks" and task.loss.path == "batched" and task.loss.batched_works
    assert archive.model._accuracy is accuracy and (accuracy.correct_count, accuracy.total_count) == before
    task.loss.batched_works = False  # a model whose batched forward mixes instances: vmap-ed single instances
    computation = ist.compute_scores(task, "lissa", {"depth_iters": 3})
    vmapped = computation.matrix()
    assert task.loss.path == "vmap" and computation.model.grad_strategy == "vmap"  # hooks disagreed under vmap
    torch.testing.assert_close(vmapped, batched, rtol=1e-5, atol=1e-6 * float(batched.abs().max()))
    task.loss.vmap_works = False  # what a model that vmap cannot trace gets as well: one forward per instance
    looped = ist.compute_scores(task, "lissa", {"depth_iters": 3}).matrix()
    assert task.loss.path == "per-instance"
    torch.testing.assert_close(looped, batched, rtol=1e-5, atol=1e-6 * float(batched.abs().max()))

    with_ids = load(data)
    assert with_ids.keys("test")[:2] == [json.loads(line)["id"] for line in open(data["test"])][:2]


def test_weight_decay_becomes_l2(data):
    assert load(data).l2 == 0.0
    assert load(data, overrides=json.dumps({"trainer.optimizer.weight_decay": 0.01})).l2 == 0.01
    assert load(data, overrides=json.dumps({"trainer.optimizer.weight_decay": 0.01}), l2="0").l2 == 0.0


def run_cli(*args):
    result = CliRunner().invoke(cli, ["run", *args, "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    return lines[0]


def test_bad_input_is_one_line(data, tmp_path, monkeypatch):
    not_archive = tmp_path / "model.tar.gz"
    not_archive.write_text("not a tarball")
    spec = f"allennlp:{data['archive']}"
    assert "not a loadable AllenNLP model archive" in run_cli(f"allennlp:{not_archive}", "--train-data",
                                                              data["train"], "--test-data", data["test"])
    assert "does not exist" in run_cli("allennlp:missing.tar.gz", "--train-data", data["train"])
    message = run_cli(spec, "--train-data", str(tmp_path / "nope.jsonl"), "--test-data", data["test"])
    assert "cannot read train data" in message and "nope.jsonl" in message
    unlabeled = write_data(tmp_path / "unlabeled.jsonl", 5, seed=2, labels=False)
    assert "returned no 'loss'" in run_cli(spec, "--train-data", data["train"], "--test-data", unlabeled)

    monkeypatch.setitem(sys.modules, "allennlp", None)  # as if it were not installed
    message = run_cli(spec, "--train-data", data["train"], "--test-data", data["test"])
    assert "pip install --no-deps -r requirements-allennlp.txt" in message
    with pytest.raises(InfluenceStoreError, match="requirements-allennlp"):
        task_from_model(torch.nn.Linear(1, 1), None, data["train"], data["test"])


PLUGIN_MODULE = """
from allennlp.models import Model
from allennlp.models.basic_classifier import BasicClassifier


@Model.register("influence_store_plugin_classifier")
class PluginClassifier(BasicClassifier):
    \"\"\"Registered only when AllenNLP's plugin discovery imports this module.\"\"\"
"""


def retyped_archive(archive, out, model_type):
    """A copy of ``archive`` whose config names another model type, read by AllenNLP's own JSONL reader."""
    import tarfile

    unpacked = out.parent / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    config = json.loads((unpacked / "config.json").read_text())
    config["model"]["type"] = model_type
    config["dataset_reader"]["type"] = "text_classification_json"  # the test module's own reader is not there
    (unpacked / "config.json").write_text(json.dumps(config))
    with tarfile.open(out, "w:gz") as tar:
        for member in unpacked.iterdir():
            tar.add(member, arcname=member.name)
    return out


def test_a_model_from_an_allennlp_plugin_loads_as_simple_influence_loads_it(data, tmp_path):
    """A model type that only a module listed in .allennlp_plugins registers: the CLI, started in that folder,
    imports the plugin (as SimpleInfluence.from_path does); without the plugins file it is one clear line."""
    archive = retyped_archive(data["archive"], tmp_path / "model.tar.gz", "influence_store_plugin_classifier")
    (tmp_path / "influence_store_test_plugin.py").write_text(PLUGIN_MODULE)
    command = [sys.executable, "-c", "from influence_store.cli import main; main()", "--db",
               str(tmp_path / "s.db"), "run", f"allennlp:{archive}", "--train-data", data["train"], "--test-data",
               data["test"], "-a", "lissa", "-o", "depth_iters", "2", "--no-self-influence", "--quiet", "--json"]
    missing = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 1
    message = missing.stderr.strip().splitlines()[-1]
    assert "'influence_store_plugin_classifier' is not a registered name for 'Model')" in message, message
    assert message.endswith("list the module that registers it in a .allennlp_plugins file in this folder, "
                            "as AllenNLP needs")
    (tmp_path / ".allennlp_plugins").write_text("influence_store_test_plugin\n")
    found = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr[-2000:]
    assert json.loads(found.stdout.strip().splitlines()[-1])["status"] == "done"


def test_allennlp_modules_outside_its_models_are_imported_only_for_an_archive_that_needs_them(data, monkeypatch):
    """Without declared plugins, AllenNLP's remaining modules (import_plugins) are imported only after the
    archive names a type that allennlp.models does not register, and then the load is tried again."""
    import allennlp.models.archival as archival
    from allennlp.common.checks import ConfigurationError

    from influence_store.plugins import allennlp_tasks

    real, imported, attempts, registered = archival.load_archive, [], [], {"by allennlp.models": False}

    def load_archive(*args, **kwargs):
        attempts.append(len(imported))
        if not (registered["by allennlp.models"] or imported):
            raise ConfigurationError("'some_model' is not a registered name for 'Model'.")
        return real(*args, **kwargs)

    monkeypatch.setattr(archival, "load_archive", load_archive)
    monkeypatch.setattr(allennlp_tasks, "_plugins_declared", lambda: False)
    monkeypatch.setattr(allennlp_tasks, "_import_allennlp_plugins", lambda: imported.append(True))
    assert allennlp_tasks.load_archive(data["archive"]).model is not None
    assert attempts == [0, 1] and imported == [True]
    imported.clear(), attempts.clear()
    registered["by allennlp.models"] = True  # an archive of allennlp.models' own types: no plugin import
    assert allennlp_tasks.load_archive(data["archive"]).model is not None
    assert attempts == [0] and imported == []


class _Classifier(torch.nn.Module):
    """forward(**batch) -> {"loss"} like an AllenNLP model; ``mixes`` makes each instance's logits depend on
    the rest of the batch (subtracting the batch mean), an interaction the batched path must not take."""

    def __init__(self, mixes: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.loss, self.mixes = torch.nn.Linear(5, 3), torch.nn.CrossEntropyLoss(), mixes

    def forward(self, x, label):
        logits = self.linear(x)
        if self.mixes:
            logits = logits - 0.5 * logits.mean(0, keepdim=True)
        return {"loss": self.loss(logits, label)}


@pytest.mark.parametrize("mixes", [False, True])
def test_the_batched_loss_is_used_only_where_instances_do_not_interact(mixes):
    from influence_store.plugins.allennlp_loss import _batched_agrees

    batch = {"x": torch.randn(100, 5, generator=torch.Generator().manual_seed(1)), "label": torch.arange(100) % 3}
    model = _Classifier(mixes).train()
    assert _batched_agrees(model, batch, 100) is not mixes
    assert model.training  # its mode is restored
