"""The plugin manager: built-ins, entry points and plugin files, all registered the same way.

Built-in plugins are ordinary modules listed by name below; third-party packages join through the
``influence_store`` entry-point group; single files join through ``--plugins-dir`` or the
``INFLUENCE_STORE_PLUGINS_DIR`` environment variable. Registries are built lazily, once, by calling
each hook implementation with a ``register`` function owned by the host, so a duplicate name is an
error that names both plugins. Set ``INFLUENCE_STORE_TRACE_HOOKS=1`` to see every hook call on stderr.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pluggy

from . import __version__, hookspecs
from .errors import InfluenceStoreError
from .options import NoOptions

ENTRY_POINT_GROUP = "influence_store"

BUILTIN_PLUGINS = (
    "influence_store.plugins.lissa",
    "influence_store.plugins.exact",
    "influence_store.plugins.ekfac",
    "influence_store.plugins.freezing",
    "influence_store.plugins.python_tasks",
    "influence_store.plugins.allennlp_tasks",
    "influence_store.plugins.proposal_rules",
)

HOOK_NAMES = tuple(name for name in vars(hookspecs) if name.startswith("register_"))

# hook name -> kind of implementation, as messages name it
REGISTRY_HOOKS = {
    "register_approximators": "approximator",
    "register_freezing_policies": "freezing policy",
    "register_task_loaders": "task loader",
    "register_proposal_rules": "proposal rule",
}


@dataclass(frozen=True)
class Registered:
    """One registered implementation and the plugin that provided it."""

    name: str
    cls: type
    plugin: str

    @property
    def options_cls(self) -> type:
        return getattr(self.cls, "Options", NoOptions)

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""


_pm: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Registered]] = {}
_loaded_dirs: set[Path] = set()
_packages: dict[str, tuple[str, str]] = {}  # entry-point plugin name -> (package, version)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("influence_store")
        pm.add_hookspecs(hookspecs)
        for module_name in BUILTIN_PLUGINS:
            _register(pm, importlib.import_module(module_name), module_name)
        _load_entry_points(pm)  # a broken installed plugin fails every command, naming itself, until fixed
        _pm = pm
        for directory in os.environ.get("INFLUENCE_STORE_PLUGINS_DIR", "").split(os.pathsep):
            if directory:
                load_plugins_dir(directory)
    return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register installed packages' ``influence_store`` entry points; errors name plugin and package.

    Done here rather than with pluggy's ``load_setuptools_entrypoints`` so that a plugin that fails to
    import, or fails validation, is reported by name and package instead of as a bare traceback.
    """
    _packages.clear()
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points.select(group=ENTRY_POINT_GROUP):
            package = (dist.metadata["Name"], dist.version)
            where = f"{entry_point.name!r} (package {package[0]} {package[1]})"
            try:
                plugin = entry_point.load()
            except Exception as exc:
                raise InfluenceStoreError(f"installed plugin {where} failed to import: {type(exc).__name__}: "
                                          f"{_one_line(exc)}; fix or uninstall it") from None
            if pm.get_plugin(entry_point.name) is plugin:  # the same package seen twice on sys.path
                continue
            _register(pm, plugin, entry_point.name, where=f"installed plugin {where}")
            _packages[entry_point.name] = package


def load_plugins_dir(directory: str | os.PathLike) -> list[str]:
    """Register every ``*.py`` file in ``directory`` as a plugin; returns the plugin names."""
    path = Path(directory).resolve()
    if not path.is_dir():
        raise InfluenceStoreError(f"plugins directory {str(directory)!r} does not exist; pass an existing folder")
    pm = get_plugin_manager()
    names = []
    if path in _loaded_dirs:
        return names
    for file in sorted(path.glob("*.py")):
        name = f"plugins_dir.{file.stem}"
        if pm.get_plugin(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and type hints resolve names through sys.modules
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a broken user file must name itself
            del sys.modules[name]
            raise InfluenceStoreError(
                f"plugin file {str(file)!r} failed to import: {type(exc).__name__}: {exc}") from None
        try:
            _register(pm, module, name)
        except InfluenceStoreError:
            del sys.modules[name]
            raise
        names.append(name)
    _loaded_dirs.add(path)
    _registries.clear()
    return names


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object (module or class with hook implementations); for tests and notebooks."""
    pm = get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    _register(pm, plugin, name)
    _registries.clear()
    return name


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered by name."""
    get_plugin_manager().unregister(name=name)
    _registries.clear()


def call_hook(hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of a hook, one plugin at a time, so errors can name the plugin."""
    for impl in _implementations(hook_name):
        _call(impl, hook_name, kwargs)


def _call(impl, hook_name: str, kwargs: dict[str, Any]) -> None:
    try:
        impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
    except InfluenceStoreError:
        raise
    except Exception as exc:  # a plugin's own bug must name the plugin, not surface as a bare traceback
        raise InfluenceStoreError(
            f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from None


def _implementations(hook_name: str):
    """Hook implementations in registration order (built-ins first), traced when asked."""
    trace = os.environ.get("INFLUENCE_STORE_TRACE_HOOKS")
    for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls():  # pluggy keeps them in this order
        if trace:
            print(f"[influence_store] {hook_name} -> {impl.plugin_name}", file=sys.stderr)
        yield impl


def registry(hook_name: str) -> dict[str, Registered]:
    """All implementations registered through one of the ``register_*`` hooks, by name."""
    if hook_name in _registries:
        return _registries[hook_name]
    kind = REGISTRY_HOOKS[hook_name]
    found: dict[str, Registered] = {}
    for impl in _implementations(hook_name):
        _call(impl, hook_name, {"register": _registrar(found, kind, impl.plugin_name)})
    _registries[hook_name] = found
    return found


def lookup(hook_name: str, name: str) -> Registered:
    """One registered implementation, or an error that lists the available names."""
    found = registry(hook_name)
    if name not in found:
        kind = REGISTRY_HOOKS[hook_name]
        available = ", ".join(sorted(found)) or "none"
        raise InfluenceStoreError(f"unknown {kind} {name!r}; available: {available}")
    return found[name]


def plugin_summaries(include_builtins: bool = True) -> list[dict[str, Any]]:
    """Name, version and implemented hooks of every plugin, for ``influence-store plugins``."""
    pm = get_plugin_manager()
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        builtin = name in BUILTIN_PLUGINS
        if builtin and not include_builtins:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        package, version = ("influence-store", __version__) if builtin else _packages.get(name, (None, None))
        rows.append({
            "name": name,
            "version": version,
            "package": package,
            "builtin": builtin,
            "hooks": hooks,
        })
    return rows


def _registrar(found: dict[str, Registered], kind: str, plugin_name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise InfluenceStoreError(
                f"plugin {plugin_name!r} registered a {kind} without a string 'name' attribute: {cls!r}")
        options_cls = getattr(cls, "Options", NoOptions)
        if not dataclasses.is_dataclass(options_cls):
            raise InfluenceStoreError(
                f"plugin {plugin_name!r}: {kind} {name!r} has an Options that is not a dataclass")
        if name in found:
            raise InfluenceStoreError(
                f"plugin {plugin_name!r} registers {kind} {name!r}, which plugin {found[name].plugin!r} "
                f"already registered; choose another name")
        found[name] = Registered(name, cls, plugin_name)
        return cls

    return register


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, where: str | None = None) -> None:
    """Register and validate one plugin; a rejected plugin is unregistered so the manager stays usable.

    ``where`` names the plugin in messages (default ``plugin 'NAME'``).
    """
    where = where or f"plugin {name!r}"
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise InfluenceStoreError(f"{where} is invalid: {_one_line(exc)}") from None
    except ValueError:  # pluggy's message dumps every registered plugin: say what clashed instead
        taken = f"the name {name!r} is already taken" if pm.get_plugin(name) is not None else \
            f"it is already registered as {pm.get_name(plugin)!r}"
        raise InfluenceStoreError(f"{where} could not be registered: {taken}") from None
    try:
        pm.check_pending()  # earlier plugins passed this check, so a failure is this plugin's
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        raise InfluenceStoreError(f"{where} implements a hook that does not exist: {_one_line(exc)}; "
                                  f"hooks are {', '.join(HOOK_NAMES)}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
