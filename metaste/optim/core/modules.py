"""Which modules a closure runs, found without hooks (docs/design.md §4.5, §10.5).

FOGZO's perturbed passes must leave the buffers (BatchNorm running statistics) as the clean pass
left them. Without a list of modules, :class:`~.snapshot.BufferGuard` finds the modules that run
with a global forward pre-hook; Dynamo cannot trace that hook through ``torch.compile(model)`` (an ``AssertionError``:
the module is "already tracked for mutation") and, with ``model.compile()``, every new hook handle
is a new guard, so each step recompiles until the recompile limit drops the model to eager.
:func:`captured_modules` instead finds the ``nn.Module`` objects a closure refers to — its cells,
defaults, the globals it names, ``functools.partial`` arguments, a bound method's object and that
object's attributes, the parts of an :class:`~.amp.Accumulated` — and ``BufferGuard(modules)``
snapshots all their buffers up front: nothing runs inside the model's forward, so a compiled
model keeps one graph.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import Tensor, nn

from .amp import Accumulated

__all__ = ["captured_modules", "outermost"]

_MAX_DEPTH = 4


def captured_modules(fn: Any) -> list[nn.Module]:
    """The ``nn.Module`` objects reachable from the callable ``fn`` (see the module docstring),
    each once, in the order found; a found module's submodules may be among them (the caller
    drops them with :func:`outermost`, once per distinct set)."""
    found: dict[int, nn.Module] = {}
    _walk(fn, found, set(), 0)
    return list(found.values())


def outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` without repeats and without the submodules of another one in the list."""
    unique = list({id(m): m for m in modules}.values())
    inner = {id(m) for top in unique for m in top.modules() if m is not top}
    return [m for m in unique if id(m) not in inner]


def _walk(obj: Any, found: dict[int, nn.Module], seen: set[int], depth: int) -> None:
    if depth > _MAX_DEPTH or id(obj) in seen or isinstance(obj, (Tensor, str, bytes, int, float, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        found[id(obj)] = obj
        return
    nxt = depth + 1
    if isinstance(obj, Accumulated):
        for c in obj.closures:
            _walk(c, found, seen, nxt)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            _walk(x, found, seen, nxt)
        return
    if isinstance(obj, dict):
        for x in obj.values():
            _walk(x, found, seen, nxt)
        return
    if isinstance(obj, functools.partial):
        for x in (obj.func, *obj.args, *obj.keywords.values()):
            _walk(x, found, seen, nxt)
        return
    if isinstance(obj, types.MethodType):
        _walk(obj.__func__, found, seen, nxt)
        _walk(obj.__self__, found, seen, nxt)
        return
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                _walk(cell.cell_contents, found, seen, nxt)
            except ValueError:  # an empty cell
                pass
        for x in (*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()):
            _walk(x, found, seen, nxt)
        g = obj.__globals__
        for name in obj.__code__.co_names:
            if name in g and not isinstance(g[name], types.ModuleType):
                _walk(g[name], found, seen, nxt)
        return
    if isinstance(obj, (types.ModuleType, type)) or callable(obj) and not hasattr(obj, "__dict__"):
        return
    attrs = getattr(obj, "__dict__", None)  # an object a bound method or a closure carries
    if isinstance(attrs, dict):
        for x in attrs.values():
            if isinstance(x, nn.Module):
                found[id(x)] = x
            elif isinstance(x, (types.FunctionType, types.MethodType, functools.partial)):
                _walk(x, found, seen, nxt)
