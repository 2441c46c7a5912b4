import pytest

from influence_store import plugin_manager


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    """Every test gets its own store file, so no test touches a real database."""
    monkeypatch.setenv("INFLUENCE_STORE_DB", str(tmp_path / "store.db"))
    monkeypatch.setenv("INFLUENCE_STORE_PHASE_SECONDS", "1e9")  # phase lines depend on wall time: off in tests
    yield


@pytest.fixture
def throwaway_plugin():
    """Register a plugin object for one test, then remove it: ``throwaway_plugin(obj, name)``."""
    names = []

    def register(plugin, name):
        names.append(plugin_manager.register_plugin(plugin, name))
        return name

    yield register
    for name in names:
        plugin_manager.unregister_plugin(name)


@pytest.fixture(scope="session")
def digits_template(tmp_path_factory):
    """A store holding one finished exact run (with self-influence) of the bundled noisy-digits example.

    Computed once per session (~20 s); tests copy it with ``digits_store`` instead of recomputing.
    Returns (path, run_id).
    """
    from influence_store.examples import digits_noisy
    from influence_store.runs import execute_run
    from influence_store.store import Store

    path = tmp_path_factory.mktemp("digits") / "template.db"
    result = execute_run(Store(str(path)), "influence_store.examples.digits_noisy:task", approximator="exact")
    Store(str(path)).engine.dispose()
    assert digits_noisy.FLIP_RATE == 0.10
    return path, result.run_id


@pytest.fixture
def digits_store(digits_template, tmp_path, monkeypatch):
    """A private copy of the digits template store, also set as $INFLUENCE_STORE_DB. Returns (Store, run_id)."""
    from influence_store.store import Store
    from stored import copy_store

    source, run_id = digits_template
    target = copy_store(source, tmp_path / "digits.db")
    monkeypatch.setenv("INFLUENCE_STORE_DB", str(target))
    return Store(str(target)), run_id
