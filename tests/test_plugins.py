"""Plugins: discovery (entry points, --plugins-dir, the env var), listings, bad plugins, tracing, docs."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import influence_store as ist
import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store import hookspecs, plugin_manager
from influence_store.cli.main import cli
from influence_store.options import describe_options
from tasks import breast_cancer_task, small_breast_cancer_task

ROOT = Path(__file__).resolve().parent.parent
HOOKS = plugin_manager.HOOK_NAMES
SMALL_TASK = f"{ROOT / 'tests' / 'tasks.py'}:small_breast_cancer_task"  # works from any folder


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A new plugin manager for one test, so plugins it loads never leak into other tests."""
    monkeypatch.setattr(plugin_manager, "_pm", None)
    monkeypatch.setattr(plugin_manager, "_registries", {})
    monkeypatch.setattr(plugin_manager, "_loaded_dirs", set())
    monkeypatch.setattr(plugin_manager, "_packages", {})
    monkeypatch.chdir(ROOT)
    commands = dict(cli.commands)
    yield
    cli.commands.clear()
    cli.commands.update(commands)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def plugin_file(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return folder


def stored_scores(run_id: str, n_test: int, n_train: int) -> torch.Tensor:
    """A run's [n_test, n_train] scores read back through `influence-store scores` (keys are positions)."""
    rows = []
    for test in range(n_test):
        shown = invoke("scores", run_id, "--test", str(test), "--top", str(n_train), "--json")
        assert shown.exit_code == 0, shown.output
        by_key = {int(row["key"]): row["score"] for row in json.loads(shown.output)["helpful"]}
        assert sorted(by_key) == list(range(n_train))
        rows.append([by_key[train] for train in range(n_train)])
    return torch.tensor(rows, dtype=torch.float64)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


# ---------- the cg package, installed with pip like CI does ----------

def test_cg_package_is_discovered_through_its_entry_point():
    """A fresh `influence-store` process finds cg through the `influence_store` entry-point group."""
    try:
        version = importlib.metadata.version("influence-store-cg")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("install the example plugin first: pip install ./examples/influence-store-cg")
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="influence_store") if ep.name == "cg"]
    assert entry_point.value == "influence_store_cg"
    executable = Path(sys.executable).parent / "influence-store"
    shown = subprocess.run([str(executable), "plugins", "--json"], capture_output=True, text=True, check=True)
    (row,) = [row for row in json.loads(shown.stdout) if row["name"] == "cg"]
    assert row == {"name": "cg", "package": "influence-store-cg", "version": version, "builtin": False,
                   "hooks": ["register_approximators"]}


def test_approximators_lists_cg_with_its_options():
    from influence_store_cg import ConjugateGradient

    rows = {row["name"]: row for row in json.loads(invoke("approximators", "--json").output)}
    assert {"cg", "exact", "lissa"} <= set(rows)
    assert rows["cg"]["plugin"] == "cg"
    assert rows["cg"]["options"] == [vars(info) for info in describe_options(ConjugateGradient.Options)]
    table = invoke("approximators", "--options").output
    assert "cg  (cg)" in table and "-o tol (float, default 1e-06): stop a column" in table


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_cg_matches_exact_on_l2_logistic_regression(damping):
    task = breast_cancer_task()
    exact = ist.compute_scores(task, approximator="exact", options={"damping": damping}).matrix()
    computation = ist.compute_scores(task, approximator="cg", options={"damping": damping})
    cg = computation.matrix()
    assert float((cg - exact).norm() / exact.norm()) <= 1e-4
    assert float((cg - exact).abs().max() / exact.abs().max()) <= 1e-4
    diagnostics = computation.diagnostics["approximator"]
    assert diagnostics["solves"] and diagnostics["max_relative_residual"] <= 2e-6
    assert computation.settings["effective_damping"] == damping


def test_run_with_cg_stores_scores_that_match_exact():
    """End to end: `run -a cg` into the store, read back with `runs show`."""
    created = invoke("run", SMALL_TASK, "-a", "cg", "-o", "tol", "1e-8", "-o", "max_iter", "200", "--json")
    assert created.exit_code == 0, created.output
    run_id = str(json.loads(created.output)["run_id"])
    shown = json.loads(invoke("runs", "show", run_id, "--json").output)
    assert shown["approximator"] == "cg" and shown["status"] == "done"
    assert shown["settings"]["options"] == {"damping": 0.0, "tol": 1e-8, "max_iter": 200}
    diagnostics = shown["diagnostics"]["approximator"]  # cg's own diagnostics, stored with the run
    assert diagnostics["solves"] and 0 < diagnostics["max_relative_residual"] <= 2e-8
    exact = ist.compute_scores(small_breast_cancer_task(), approximator="exact").matrix()
    stored = stored_scores(run_id, *exact.shape)
    assert float((stored - exact).norm() / exact.norm()) <= 1e-6


# ---------- listings ----------

def test_plugins_lists_builtins_only_with_all():
    builtin = {row["name"]: row for row in json.loads(invoke("plugins", "--all", "--json").output)}
    assert set(plugin_manager.BUILTIN_PLUGINS) <= set(builtin)
    assert builtin["influence_store.plugins.lissa"]["hooks"] == ["register_approximators"]
    assert builtin["influence_store.plugins.lissa"]["version"] == ist.__version__
    default = json.loads(invoke("plugins", "--json").output)
    assert not any(row["builtin"] for row in default)


def test_policies_options_show_defaults_and_help():
    rows = {row["name"]: row for row in json.loads(invoke("policies", "--options", "--json").output)}
    assert {"all", "regex", "last-layer", "modules"} <= set(rows)
    for name, entry in plugin_manager.registry("register_freezing_policies").items():
        assert rows[name]["options"] == [vars(info) for info in describe_options(entry.options_cls)]
    table = invoke("policies", "--options").output
    assert "-f patterns (list[str], default []): regular expressions" in table


# ---------- single-file plugins ----------

BIAS_POLICY = """
    from influence_store import FreezingPolicy, hookimpl

    class BiasOnly(FreezingPolicy):
        '''Track only the bias.'''

        name = "bias-only"

        def tracked(self, model):
            return [n for n, _ in model.named_parameters() if n.endswith("bias")]

    @hookimpl
    def register_freezing_policies(register):
        register(BiasOnly)
"""


def test_plugins_dir_policy_is_used_by_the_cli(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "bias_only", BIAS_POLICY)
    listed = json.loads(invoke("--plugins-dir", str(folder), "policies", "--json").output)
    assert {"name": "bias-only", "plugin": "plugins_dir.bias_only", "summary": "Track only the bias.",
            "options": []} in listed
    created = invoke("--plugins-dir", str(folder), "run", SMALL_TASK, "-a", "exact", "--freeze", "bias-only",
                     "--json")
    assert created.exit_code == 0, created.output
    run_id = str(json.loads(created.output)["run_id"])
    shown = json.loads(invoke("runs", "show", run_id, "--json").output)
    assert shown["settings"]["tracked_parameters"] == ["bias"]
    # Independent check: with only the bias tracked, g = (p - y) and H = mean p(1-p) + l2.
    task = small_breast_cancer_task()
    with torch.no_grad():
        (x_train, y_train), (x_test, y_test) = (task.batch(split, range(len(getattr(task, split))))
                                                for split in ("train", "test"))
        p_train, p_test = (torch.sigmoid(task.model(x).squeeze(-1)) for x in (x_train, x_test))
    hessian = (p_train * (1 - p_train)).mean() + task.l2
    expected = torch.outer(p_test - y_test, p_train - y_train) / hessian
    assert torch.allclose(stored_scores(run_id, *expected.shape), expected, rtol=1e-8)


def test_plugins_dir_from_the_environment(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "bias_only", BIAS_POLICY)
    listed = invoke("policies", "--json", env={"INFLUENCE_STORE_PLUGINS_DIR": str(folder)})
    assert "bias-only" in {row["name"] for row in json.loads(listed.output)}
    names = ist.compute_scores(small_breast_cancer_task(), "exact", freeze="bias-only").settings["tracked_parameters"]
    assert names == ["bias"]


def test_plugins_dir_that_does_not_exist(tmp_path, fresh_plugins):
    assert_one_line_error(invoke("--plugins-dir", str(tmp_path / "nowhere"), "policies"), "does not exist")


def test_plugins_dir_file_that_fails_to_import(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "broken", "import not_a_module_anywhere\n")
    assert_one_line_error(invoke("--plugins-dir", str(folder), "approximators"), "broken.py",
                          "failed to import", "not_a_module_anywhere")


def test_plugins_dir_file_adds_a_command(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "hello", """
        import click
        from influence_store import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("who")
            def hello(who):
                '''Greet WHO.'''
                click.echo(f"hello {who}")
    """)
    assert invoke("--plugins-dir", str(folder), "hello", "curator").output == "hello curator\n"


def test_failing_command_hook_names_the_plugin(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "bad_command", """
        from influence_store import hookimpl

        @hookimpl
        def register_commands(cli):
            raise KeyError("no such group")
    """)
    assert_one_line_error(invoke("--plugins-dir", str(folder), "plugins"), "'plugins_dir.bad_command'",
                          "failed in register_commands: KeyError")


# ---------- plugins that are wrong ----------

def test_duplicate_name_through_the_cli_names_both_plugins(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "second_exact", """
        from influence_store import Approximator, hookimpl

        class AnotherExact(Approximator):
            name = "exact"

        @hookimpl
        def register_approximators(register):
            register(AnotherExact)
    """)
    assert_one_line_error(invoke("--plugins-dir", str(folder), "approximators"),
                          "'plugins_dir.second_exact'", "'exact'", "'influence_store.plugins.exact'")


def test_duplicate_name_from_a_registered_plugin(throwaway_plugin):
    class Policy(ist.FreezingPolicy):
        name = "last-layer"

    class Duplicate:
        @ist.hookimpl
        def register_freezing_policies(self, register):
            register(Policy)

    throwaway_plugin(Duplicate(), "duplicate-policy")
    with pytest.raises(ist.InfluenceStoreError, match="plugin 'duplicate-policy' registers freezing policy "
                                                      "'last-layer', which plugin 'influence_store.plugins.freezing'"):
        plugin_manager.lookup("register_freezing_policies", "all")


def test_unknown_hook_through_the_cli_names_the_plugin(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "misspelt", """
        from influence_store import hookimpl

        @hookimpl
        def register_approximator(register):
            pass
    """)
    assert_one_line_error(invoke("--plugins-dir", str(folder), "plugins"), "'plugins_dir.misspelt'",
                          "hook that does not exist", "register_approximator'", "register_approximators")


def installed_package(site: Path, module_source: str) -> None:
    """A package installed into ``site`` as pip would: its module plus a dist-info with the entry point."""
    site.mkdir()
    (site / "influence_store_extra.py").write_text(textwrap.dedent(module_source))
    dist_info = site / "influence_store_extra-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: influence-store-extra\nVersion: 0.3\n")
    (dist_info / "entry_points.txt").write_text("[influence_store]\nextra = influence_store_extra\n")


@pytest.mark.parametrize("source, message", [
    ("from influence_store import hookimpl\n@hookimpl\ndef register_policies(register):\n    pass\n",
     "implements a hook that does not exist"),
    ("from influence_store import hookimpl\n@hookimpl\ndef register_approximators(registry):\n    pass\n",
     "is invalid"),
    ("import influence_store_missing_dependency\n", "failed to import: ModuleNotFoundError"),
])
def test_broken_installed_plugin_names_itself_and_its_package(tmp_path, monkeypatch, fresh_plugins, source, message):
    installed_package(tmp_path / "site", source)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "influence_store_extra", raising=False)
    assert_one_line_error(invoke("approximators"), "installed plugin 'extra' (package influence-store-extra 0.3)",
                          message)


def test_installed_plugin_is_listed_with_its_package(tmp_path, monkeypatch, fresh_plugins):
    installed_package(tmp_path / "site", BIAS_POLICY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "influence_store_extra", raising=False)
    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
    assert rows["extra"] == {"name": "extra", "package": "influence-store-extra", "version": "0.3",
                              "builtin": False, "hooks": ["register_freezing_policies"]}
    assert plugin_manager.lookup("register_freezing_policies", "bias-only").plugin == "extra"


def test_rejected_plugin_leaves_the_manager_usable():
    class Misspelt:
        @ist.hookimpl
        def register_policies(self, register):
            pass

    with pytest.raises(ist.InfluenceStoreError, match="plugin 'misspelt' implements a hook that does not exist"):
        plugin_manager.register_plugin(Misspelt(), "misspelt")
    assert plugin_manager.get_plugin_manager().get_plugin("misspelt") is None
    assert "exact" in plugin_manager.registry("register_approximators")


def test_plugin_name_that_is_taken():
    with pytest.raises(ist.InfluenceStoreError, match="^plugin 'influence_store.plugins.exact' could not be "
                                                      "registered: the name 'influence_store.plugins.exact' is "
                                                      "already taken$"):
        plugin_manager.register_plugin(object(), "influence_store.plugins.exact")


def test_wrong_hook_arguments_name_the_plugin(tmp_path, fresh_plugins):
    folder = plugin_file(tmp_path / "plugins", "wrong_args", """
        from influence_store import hookimpl

        @hookimpl
        def register_approximators(registry):
            pass
    """)
    assert_one_line_error(invoke("--plugins-dir", str(folder), "approximators"), "'plugins_dir.wrong_args'",
                          "is invalid", "registry")


@pytest.mark.parametrize("body, message", [
    ("raise RuntimeError('model zoo offline')", "failed in register_approximators: RuntimeError: model zoo"),
    ("register(type('Nameless', (), {}))", "without a string 'name' attribute"),
    ("register(type('Loose', (), {'name': 'loose', 'Options': dict}))", "has an Options that is not a dataclass"),
])
def test_broken_registrations_name_the_plugin(throwaway_plugin, body, message):
    namespace = {}
    exec(f"def register_approximators(register):\n    {body}", namespace)
    hook = staticmethod(ist.hookimpl(namespace["register_approximators"]))
    plugin = type("Broken", (), {"register_approximators": hook})
    throwaway_plugin(plugin, "broken-approximators")
    with pytest.raises(ist.InfluenceStoreError, match=rf"plugin 'broken-approximators'.*{re.escape(message)}"):
        plugin_manager.registry("register_approximators")


# ---------- the remaining hooks, and tracing ----------

def test_task_loader_plugin_resolves_its_prefix(throwaway_plugin):
    class Breast(ist.TaskLoader):
        name = "breast"

        def load(self, target):
            return breast_cancer_task(n_train=int(target))

    class Loaders:
        @ist.hookimpl
        def register_task_loaders(self, register):
            register(Breast)

    throwaway_plugin(Loaders(), "loaders")
    task = ist.load_task("breast:50")
    assert len(task.train) == 50


def test_proposal_rule_plugin_is_used_by_propose(throwaway_plugin):
    """A rule registered through register_proposal_rules ranks a stored run's examples for `propose`."""
    from dataclasses import dataclass

    from influence_store.curation import ProposalRule
    from influence_store.options import option

    class LowestLoss(ProposalRule):
        """The best-fitted training examples (a deliberately odd rule, to be told apart from the built-ins)."""

        name = "lowest-loss"

        @dataclass
        class Options:
            skip: int = option(0, "leave out this many best-fitted examples first")

        def candidates(self, store, run):
            info = store.run_examples(run["id"], "train")
            order = sorted(info, key=lambda e: info[e]["loss"])[self.options.skip:]
            return [(e, {"train_loss": info[e]["loss"]}) for e in order]

    class Rules:
        @ist.hookimpl
        def register_proposal_rules(self, register):
            register(LowestLoss)

    throwaway_plugin(Rules(), "rules")
    (row,) = [row for row in plugin_manager.plugin_summaries() if row["name"] == "rules"]
    assert row["hooks"] == ["register_proposal_rules"]
    listed = {row["name"]: row for row in json.loads(invoke("rules", "--json").output)}
    assert listed["lowest-loss"]["plugin"] == "rules"
    created = invoke("run", SMALL_TASK, "-a", "exact", "--no-self-influence", "--json")
    run_id = str(json.loads(created.output)["run_id"])
    proposed = invoke("propose", run_id, "--rule", "lowest-loss", "-o", "skip", "2", "--top", "4", "--json")
    assert proposed.exit_code == 0, proposed.output
    # Independent: the training losses straight from the task.
    task = small_breast_cancer_task()
    x, y = task.train.tensors
    with torch.no_grad():
        losses = torch.nn.functional.binary_cross_entropy_with_logits(task.model(x).squeeze(-1), y, reduction="none")
    expected = [str(int(i)) for i in torch.argsort(losses)[2:6]]
    rows = json.loads(proposed.output)
    assert [row["key"] for row in rows] == expected
    assert [row["rule"] for row in rows] == ["lowest-loss"] * 4
    assert rows[0]["evidence"]["train_loss"] == pytest.approx(float(losses[int(expected[0])]), rel=1e-12)


def test_tracing_prints_hook_calls_on_stderr(fresh_plugins):
    traced = CliRunner().invoke(cli, ["approximators"], env={"INFLUENCE_STORE_TRACE_HOOKS": "1"})
    for plugin in ("influence_store.plugins.lissa", "influence_store.plugins.exact", "cg"):
        assert f"[influence_store] register_approximators -> {plugin}\n" in traced.stderr
    assert "[influence_store]" not in traced.stdout
    plugin_manager._registries.clear()
    quiet = CliRunner().invoke(cli, ["approximators"], env={"INFLUENCE_STORE_TRACE_HOOKS": ""})
    assert quiet.stderr == ""


# ---------- the plugin guide's example and meta-tests ----------

def writing_plugins_section() -> str:
    """The plugin guide, docs/plugins.md: every hook, the interfaces, a complete example."""
    return (ROOT / "docs" / "plugins.md").read_text()


def guide_python_blocks() -> list[str]:
    """The python blocks of the plugin guide: the single-file plugin, then its test module."""
    return re.findall(r"```python\n(.*?)```", writing_plugins_section(), re.S)


def linreg_closed_form(n: int, l2: float, damping: float) -> torch.Tensor:
    """Scores of the plugin guide's linreg:N task in closed form: g = (x.w - y) x, H = X^T X / n + l2 I."""
    task = ist.load_task(f"linreg:{n}", {"l2": l2})
    (x, y), (x_test, y_test) = task.train.tensors, task.test.tensors
    w = task.model.weight.detach().reshape(-1)
    grads, test_grads = (x @ w - y)[:, None] * x, (x_test @ w - y_test)[:, None] * x_test
    hessian = x.T @ x / n + (l2 + damping) * torch.eye(x.shape[1], dtype=x.dtype)
    return test_grads @ torch.linalg.solve(hessian, grads.T)


def test_guide_example_plugin_works(tmp_path, fresh_plugins):
    """The first python block of the plugin guide is a complete single-file plugin: every hook of it works."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "my_plugins.py").write_text(guide_python_blocks()[0])
    plugins = json.loads(invoke("--plugins-dir", str(folder), "plugins", "--json").output)
    (row,) = [row for row in plugins if row["name"] == "plugins_dir.my_plugins"]
    assert row["hooks"] == sorted(HOOKS)

    # register_commands + register_task_loaders: the spectrum of H = X^T X / n + l2 I
    task = ist.load_task("linreg:200")
    x, _ = task.train.tensors
    eigenvalues = torch.linalg.eigvalsh(x.T @ x / len(x) + task.l2 * torch.eye(x.shape[1], dtype=x.dtype))
    printed = [float(v) for v in invoke("hessian-spectrum", "linreg:200").output.split()]
    assert printed == pytest.approx([float(eigenvalues[0]), float(eigenvalues[-1])], rel=1e-5)

    # approximator, policy and loader options through `run`, against the closed form
    created = invoke("run", "linreg:120", "-t", "l2", "0.5", "-a", "neumann", "--freeze", "suffix",
                     "-f", "suffix", "weight", "--json")
    assert created.exit_code == 0, created.output
    run_id = str(json.loads(created.output)["run_id"])
    shown = json.loads(invoke("runs", "show", run_id, "--json").output)
    assert shown["settings"]["tracked_parameters"] == ["weight"] and shown["effective_damping"] == 0.01
    expected = linreg_closed_form(120, l2=0.5, damping=0.01)
    stored = stored_scores(run_id, *expected.shape)
    assert torch.allclose(stored, expected, rtol=1e-6, atol=1e-9)

    # the proposal rule: the training examples that hurt test example 3 most
    proposed = invoke("propose", run_id, "--rule", "hurts-one", "-o", "test", "3", "--top", "5", "--json")
    assert proposed.exit_code == 0, proposed.output
    most_harmful = [str(int(i)) for i in torch.argsort(expected[3])[:5]]
    assert [row["key"] for row in json.loads(proposed.output)] == most_harmful
    assert all(row["evidence"]["score"] < 0 for row in json.loads(proposed.output))

    tracked = ist.compute_scores(small_breast_cancer_task(), "exact", freeze="suffix").settings["tracked_parameters"]
    assert tracked == ["bias"]


@pytest.mark.slow
def test_guide_plugin_test_module_passes(tmp_path):
    """The second python block is a pytest module for the first: run it as a plugin author would."""
    plugin, test_module = guide_python_blocks()[:2]
    (tmp_path / "my_plugins.py").write_text(plugin)
    (tmp_path / "test_my_plugins.py").write_text(test_module)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_plugins.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_every_hook_has_a_test():
    """Each hook in hookspecs is named inside some test function other than this one."""
    mentioned = set()
    for path in (ROOT / "tests").glob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and \
                    node.name != "test_every_hook_has_a_test":
                text = ast.get_source_segment(source, node)
                mentioned |= {hook for hook in HOOKS if hook in text}
    assert set(HOOKS) - mentioned == set()


def test_every_hook_signature_is_in_the_plugin_guide():
    section = writing_plugins_section()
    for hook in HOOKS:
        signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
        assert f"`{signature}`" in section, f"docs/plugins.md lacks the signature {signature}"
