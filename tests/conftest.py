import pytest

from influence_store import plugin_manager


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    """Every test gets its own store file, so no test touches a real database."""
    monkeypatch.setenv("INFLUENCE_STORE_DB", str(tmp_path / "store.db"))
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
