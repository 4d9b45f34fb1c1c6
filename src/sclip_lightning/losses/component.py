"""Components that remember how they were built: objectives and assigners.

A :class:`Component` records the arguments of the outermost ``__init__`` it was built with
(the class the user named, with its own options and whatever it forwarded to its bases), so
:meth:`Component.config` can write it as LightningCLI's ``{"class_path", "init_args"}`` and
:func:`build_component` can build it again: the module saves its objective that way in every
checkpoint, whether the objective came from a YAML file or from Python. Arguments must be
plain values (numbers, strings, booleans, None, lists, dicts) or other components.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Literal, TypeVar, get_args, get_origin

import torch.nn as nn

C = TypeVar("C", bound="Component")


class Component(nn.Module):
    """Base of the configurable parts of a model (objectives, assigners).

    Subclasses call ``super().__init__(...)`` as usual; nothing else is needed for
    :meth:`config` to describe them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_init_args"] = _outermost_init_args(self)

    @property
    def init_args(self) -> dict[str, Any]:
        """The arguments this component was built with (the outermost ``__init__``'s)."""
        return self.__dict__["_init_args"]

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: how to build this component again
        (nested components as nested configs)."""
        return {
            "class_path": class_path(type(self)),
            "init_args": {k: _plain(self, k, v) for k, v in self.init_args.items()},
        }


def class_path(cls: type) -> str:
    """``module.QualName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _outermost_init_args(obj: object) -> dict[str, Any]:
    """The arguments of the outermost ``__init__`` frame running for ``obj``: the class the
    caller named (its ``**kwargs`` flattened in), not the bases it delegated to."""
    found: dict[str, Any] = {}
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if (
            code.co_name == "__init__"
            and code.co_argcount
            and (frame.f_locals.get(code.co_varnames[0]) is obj)
        ):
            local = frame.f_locals
            n = code.co_argcount + code.co_kwonlyargcount
            found = {k: local[k] for k in code.co_varnames[1:n] if k in local}
            if code.co_flags & inspect.CO_VARKEYWORDS:
                varkw = code.co_varnames[n + bool(code.co_flags & inspect.CO_VARARGS)]
                found.update(local.get(varkw) or {})
        frame = frame.f_back
    return found


def _plain(owner: Component, name: str, value: Any) -> Any:
    if isinstance(value, Component):
        return value.config()
    if isinstance(value, (list, tuple)):
        return [_plain(owner, name, v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(owner, name, v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{type(owner).__name__} argument {name!r} is a {type(value).__name__}: components "
        "take plain values (numbers, strings, lists, dicts) or other components, so that "
        "checkpoints can rebuild them"
    )


def build_component(spec: Any, base: type[C], trusted: bool = False) -> C:
    """A component from an instance (returned as is) or a ``{"class_path", "init_args"}``
    config (nested configs built too).

    Args:
        spec: an instance of ``base``, or a config.
        base: the class the result must be an instance of.
        trusted: import the class's module when it is not imported yet. Configs read from
            a checkpoint are not trusted: their classes must already be imported (a
            checkpoint never makes this process import code).

    Raises:
        ValueError: not a config, a class that is not a ``base``, or not imported.
    """
    if isinstance(spec, base):
        return spec
    if not (isinstance(spec, dict) and "class_path" in spec):
        raise ValueError(
            f"expected a {base.__name__} or a {{'class_path', 'init_args'}} config, got {spec!r}"
        )
    module_name, _, name = spec["class_path"].rpartition(".")
    if module_name not in sys.modules and trusted:
        importlib.import_module(module_name)
    module = sys.modules.get(module_name)
    cls = getattr(module, name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        hint = "" if module is not None else f" (import {module_name} first)"
        raise ValueError(f"{spec['class_path']!r} is not an imported {base.__name__}{hint}")
    args = {
        k: build_component(v, Component, trusted) if _is_config(v) else v
        for k, v in (spec.get("init_args") or {}).items()
    }
    return cls(**args)


def _is_config(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def choices(annotation: Any) -> list[Any]:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation allows."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [
        v for a in get_args(annotation) for v in (choices(a) if a is not type(None) else [None])
    ]


def check_choice(name: str, value: Any, annotation: Any) -> None:
    """ValueError naming ``name``, its value and what a ``Literal`` annotation allows: the
    check LightningCLI makes from the annotation, for callers from Python."""
    allowed = choices(annotation)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
