"""The ``python`` task loader: ``path/to/file.py:function`` or ``package.module:function``."""

from __future__ import annotations

import importlib
import inspect
import importlib.util
import sys
from pathlib import Path

from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.task import TaskLoader


class PythonTaskLoader(TaskLoader):
    """Call a function that returns a Task: file.py:function or package.module:function."""

    name = "python"
    free_options = True  # task options (-t KEY VALUE) become keyword arguments of the function

    def load(self, target):
        where, sep, function = target.rpartition(":")
        if not sep or not where or not function:
            raise InfluenceStoreError(
                f"task spec {target!r} is not FILE.py:FUNCTION or MODULE:FUNCTION; e.g. examples/digits.py:task")
        module = _import(where)
        factory = getattr(module, function, None)
        if not callable(factory):
            raise InfluenceStoreError(f"task spec {target!r}: {where!r} has no function {function!r}")
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            signature = None
        if signature is not None and self.options:
            accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            unknown = [k for k in self.options if k not in signature.parameters and not accepts_any]
            if unknown:
                valid = ", ".join(signature.parameters) or "(none)"
                raise InfluenceStoreError(f"task function {function!r} takes no option {unknown[0]!r}; "
                                          f"its parameters: {valid}")
        return factory(**self.options)


def _import(where: str):
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise InfluenceStoreError(f"task file {where!r} does not exist; give an existing .py file")
        name = f"influence_store_task_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path.resolve())
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling need the module registered
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise InfluenceStoreError(f"task module {where!r} cannot be imported ({exc}); check the spec") from None


@hookimpl
def register_task_loaders(register):
    register(PythonTaskLoader)
