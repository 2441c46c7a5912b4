"""Bad input: each case is one clear line from the Python API and from `influence-store run`
(exit code 1, no traceback), naming what is wrong and what would be valid."""

import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

import influence_store as ist
import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from tasks import bce_loss, breast_cancer_task

# Task functions that go wrong in the ways a user's task can; written to a file and used as task specs.
BAD_TASKS = '''
import torch
from torch.utils.data import TensorDataset
import influence_store as ist
from tasks import bce_loss, breast_cancer_task


def small():
    return breast_cancer_task(n_train=40)


def mean_loss():
    task = small()
    task.loss = lambda model, batch: bce_loss(model, batch).mean()
    return task


def nan_loss():
    """Training example 7 (key 'patient-7') has a NaN feature, so its loss is NaN."""
    task = small()
    x, y = (t.clone() for t in task.train.tensors)
    x[7, 0] = float("nan")
    ids = torch.arange(len(x))
    return ist.Task(task.model, lambda model, batch: bce_loss(model, batch[:2]), TensorDataset(x, y, ids),
                    TensorDataset(*task.test.tensors, -1 - torch.arange(len(task.test))), l2=task.l2,
                    key=lambda example: f"patient-{int(example[2])}")


def empty_test():
    task = small()
    return ist.Task(task.model, bce_loss, task.train, [], l2=task.l2)


def not_a_task():
    return "model.tar.gz"


def marks_when_loaded():
    import pathlib

    pathlib.Path(__file__).with_name("loaded").touch()
    return small()
'''


@pytest.fixture
def bad_tasks(tmp_path):
    path = tmp_path / "bad_tasks.py"
    path.write_text(textwrap.dedent(BAD_TASKS))
    return path


@pytest.fixture(scope="module")
def task():
    return breast_cancer_task(n_train=40)


def one_line_error(call, *fragments):
    with pytest.raises(ist.InfluenceStoreError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------- the Python API ----------

def test_unknown_approximator_lists_the_available_ones(task):
    one_line_error(lambda: ist.compute_scores(task, approximator="lisa"),
                   "unknown approximator 'lisa'; available: ", "exact", "lissa")


def test_unknown_policy_lists_the_available_ones(task):
    one_line_error(lambda: ist.compute_scores(task, freeze="lastlayer"),
                   "unknown freezing policy 'lastlayer'; available: all, last-layer, modules, regex")


@pytest.mark.parametrize("kwargs, fragments", [
    ({"options": {"dampin": "0.1"}}, ["unknown option 'dampin' for approximator 'lissa'",
                                      "valid options: batch_size, damping, num_samples, scale"]),
    ({"options": {"damping": "lots"}}, ["invalid value 'lots' for option 'damping'", "expected float"]),
    ({"approximator": "exact", "options": {"damping": "-1"}}, ["damping must be >= 0"]),
    ({"freeze": "regex", "freeze_options": {"pattern": "x"}}, ["unknown option 'pattern'", "valid options: patterns"]),
    ({"freeze": "regex", "freeze_options": {"patterns": ["("]}}, ["not a valid regular expression"]),
])
def test_unknown_or_invalid_options_list_the_valid_ones(task, kwargs, fragments):
    one_line_error(lambda: ist.compute_scores(task, **kwargs), *fragments)


@pytest.mark.parametrize("spec, fragment", [
    ("nowhere/tasks.py:task", "task file 'nowhere/tasks.py' does not exist"),
    ("{bad}:nothing", "has no function 'nothing'"),
    ("no_such_module_xyz:task", "task module 'no_such_module_xyz' cannot be imported"),
    ("just-a-name", "is not FILE.py:FUNCTION or MODULE:FUNCTION"),
    ("{bad}:not_a_task", "returned str, not influence_store.Task"),
])
def test_task_spec_that_does_not_resolve(bad_tasks, spec, fragment):
    one_line_error(lambda: ist.load_task(spec.format(bad=bad_tasks)), fragment)


@pytest.mark.parametrize("loss, shape", [
    (lambda model, batch: bce_loss(model, batch).mean(), "returned ()"),
    (lambda model, batch: torch.stack([bce_loss(model, batch)] * 2, dim=1), "returned (40, 2)"),
    (lambda model, batch: bce_loss(model, batch).tolist(), "returned list"),
])
def test_loss_must_be_one_value_per_example(task, loss, shape):
    bad = ist.Task(task.model, loss, task.train, task.test)
    one_line_error(lambda: ist.compute_scores(bad), "one value per example (shape [40])", shape, "reduction='none'")


@pytest.mark.parametrize("split, value", [("train", float("nan")), ("test", float("inf"))])
def test_non_finite_loss_names_the_example(task, split, value):
    """The message names the example by its key (from a key function), not by its position."""

    def with_ids(data, first):  # a third tensor: a row id, which the key and the loss read
        x, y = data.tensors
        return TensorDataset(x, y, torch.arange(first, first + len(x)))

    def loss(model, batch):  # row 1003 gets a non-finite loss
        x, y, ids = batch
        return bce_loss(model, (x, y)) + torch.where(ids == 1003, value, 0.0)

    train = with_ids(task.train, 0 if split == "test" else 1000)
    test = with_ids(task.test, 1000 if split == "test" else 0)
    bad = ist.Task(task.model, loss, train, test, key=lambda example: f"row-{int(example[2])}")
    one_line_error(lambda: ist.compute_scores(bad), f"loss is {value} for {split} example 'row-1003'")


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_data(task, split):
    empty = TensorDataset(*(t[:0] for t in task.train.tensors))
    kwargs = {"train": task.train, "test": task.test, split: empty}
    one_line_error(lambda: ist.Task(task.model, bce_loss, **kwargs), f"task {split} data is empty")


def test_exact_above_max_params_names_the_ways_out(task):
    one_line_error(lambda: ist.compute_scores(task, approximator="exact", options={"max_params": 30}),
                   "above max_params=30", 'approximator="lissa"', 'freeze="last-layer"')


# ---------- the CLI: one line, exit code 1, no traceback ----------

def run(*args):
    return CliRunner().invoke(cli, ["run", *args, "--quiet"])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["-a", "lisa"], ["unknown approximator 'lisa'; available: ", "lissa"]),
    (["--freeze", "lastlayer"], ["unknown freezing policy 'lastlayer'; available: all, last-layer"]),
    (["-o", "dampin", "0.1"], ["unknown option 'dampin'", "valid options: batch_size, damping"]),
    (["-o", "scale", "huge"], ["scale must be a positive number or 'auto', got 'huge'"]),
    (["-a", "exact", "-o", "max_params", "many"], ["invalid value 'many' for option 'max_params'", "expected int"]),
    (["--freeze", "modules", "-f", "names", "decoder"], ["no module named 'decoder'"]),
    (["-a", "exact", "-o", "max_params", "30"], ["above max_params=30", "lissa", "--freeze"]),
])
def test_cli_bad_approximator_policy_and_options(bad_tasks, args, fragments):
    assert_one_line_error(run(f"{bad_tasks}:small", *args), *fragments)


@pytest.mark.parametrize("function, fragments", [
    ("missing", ["has no function 'missing'"]),
    ("mean_loss", ["one value per example", "reduction='none'"]),
    ("nan_loss", ["loss is nan for train example 'patient-7'"]),
    ("empty_test", ["task test data is empty"]),
    ("not_a_task", ["not influence_store.Task"]),
])
def test_cli_bad_tasks(bad_tasks, function, fragments):
    assert_one_line_error(run(f"{bad_tasks}:{function}"), *fragments)


def test_cli_task_file_or_module_that_does_not_exist(tmp_path):
    assert_one_line_error(run(str(tmp_path / "nope.py:task")), "does not exist")
    assert_one_line_error(run("no_such_module_xyz:task"), "cannot be imported")


def test_cli_valid_run_still_works(bad_tasks):
    """The control: the same task file with good settings stores a run."""
    result = run(f"{bad_tasks}:small", "-a", "exact", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_setting_named_in_an_error_is_spelled_for_its_reader(task, bad_tasks):
    """Python callers read the keyword argument, shell users the flag; the facts are the same."""
    message = one_line_error(lambda: ist.compute_scores(task, device="cuda:0"), "'cuda:0'", 'use device="cpu"')
    assert "--" not in message
    assert_one_line_error(run(f"{bad_tasks}:small", "--device", "cuda:0"), "'cuda:0'", "use --device cpu")


def test_a_loss_that_does_not_depend_on_the_parameters_is_refused(task):
    detached = ist.Task(task.model, lambda model, batch: bce_loss(model, batch).detach(), task.train, task.test)
    one_line_error(lambda: ist.compute_scores(detached), "does not depend on the tracked parameters")


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_non_finite_gradient_from_a_finite_loss_names_the_example(task, split):
    """sqrt at 0 for one example, far from the first few: its loss is finite, its gradient is not."""

    def with_ids(data, first):
        x, y = data.tensors
        return TensorDataset(x, y, torch.arange(first, first + len(x)))

    def loss(model, batch):
        x, y, ids = batch
        logit = model(x).squeeze(-1)
        hit = ids == 1020
        at_zero = torch.where(hit, logit ** 2 - logit.detach() ** 2, torch.ones_like(logit))  # 0 at row 1020
        return bce_loss(model, (x, y)) + torch.sqrt(at_zero) - (~hit).to(logit.dtype)

    train = with_ids(task.train, 0 if split == "test" else 1000)
    test = with_ids(task.test, 1000 if split == "test" else 0)
    bad = ist.Task(task.model, loss, train, test, key=lambda example: f"row-{int(example[2])}")
    one_line_error(lambda: ist.compute_scores(bad).matrix(), f"gradient of {split} example 'row-1020' is not finite")


@pytest.mark.parametrize("args, fragment", [
    (["--freeze", "bogus"], "unknown freezing policy 'bogus'"),
    (["--freeze", "last-layer", "-f", "nonsense", "1"], "unknown option 'nonsense'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_cli_bad_settings_fail_before_the_task_loads(bad_tasks, args, fragment):
    """A task may take minutes to load (or retrain): settings that cannot work are refused first."""
    assert_one_line_error(run(f"{bad_tasks}:marks_when_loaded", *args), fragment)
    assert not bad_tasks.with_name("loaded").exists()
