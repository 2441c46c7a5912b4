"""The ``python`` task loader: ``path/to/file.py:function`` or ``package.module:function``."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
import typing
from pathlib import Path

from influence_store.errors import InfluenceStoreError
from influence_store.hookspecs import hookimpl
from influence_store.options import parse_options
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
        options = dict(self.options)
        if signature is not None and options:
            accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            unknown = [k for k in options if k not in signature.parameters and not accepts_any]
            if unknown:
                valid = ", ".join(signature.parameters) or "(none)"
                raise InfluenceStoreError(f"task function {function!r} takes no option {unknown[0]!r}; "
                                          f"its parameters: {valid}")
            options.update(_typed_options(factory, signature, options, f"task function {function!r}"))
        return factory(**options)


def _typed_options(factory, signature, options: dict, owner: str) -> dict:
    """Options given as text (``-t KEY VALUE``) converted by each parameter's annotation, else by the type of
    its default (int, float, bool, str), as plugin options are; other values are passed on as they are."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    fields = []
    for name, value in options.items():
        parameter = signature.parameters.get(name)
        text = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if parameter is None or not text:
            continue
        kind = hints.get(name, type(parameter.default) if type(parameter.default) in (int, float, bool, str) else None)
        if kind is not None:
            fields.append((name, kind))
    given = {name: options[name] for name, _ in fields}
    return vars(parse_options(dataclasses.make_dataclass("TaskOptions", fields), given, owner))


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
