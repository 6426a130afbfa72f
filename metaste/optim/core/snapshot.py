"""Snapshots, RNG states and buffer guards: what FOGZO and the horizon methods of HyperSTE need to
run a closure again without leaving a trace (docs/design.md §3.3, §4.5).

* :class:`RngState` — the torch RNG (CPU and the given CUDA devices), optionally also Python's
  ``random`` and NumPy's global RNG. FOGZO resets the torch RNG before every perturbed pass
  (identical dropout masks); a horizon replay resets all of them (identical batches drawn by the
  user's own code).
* :class:`BufferGuard` — restores the buffers (BatchNorm running statistics) of the modules that
  run inside the context, given up front or found by a forward hook: FOGZO's perturbed passes
  update nothing, and a step that raises leaves them as they were.
* :class:`Snapshot` — parameters, optimizer state, buffers and RNG at one moment: the start of a
  horizon and every step of LGATT's trace.
* :func:`captured_bytes` — what a recorded closure keeps alive (the horizon's memory estimate).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .amp import GradientOverflow

__all__ = ["RngState", "BufferGuard", "Snapshot", "clone_value", "captured_bytes"]


def clone_value(value: Any) -> Any:
    """A detached clone of a tensor; anything else as it is."""
    return value.detach().clone() if isinstance(value, Tensor) else value


class RngState:
    """The torch RNG state of the CPU and of ``devices`` (CUDA ones only), and with
    ``python=True`` also of Python's ``random`` and NumPy's global RNG."""

    def __init__(self, devices: Iterable[torch.device] = (), *, python: bool = False) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = {d.index: torch.cuda.get_rng_state(d) for d in set(devices) if d.type == "cuda"}
        self.python = random.getstate() if python else None
        self.numpy = np.random.get_state() if python else None

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> RngState:
        rng = cls.__new__(cls)
        rng.__dict__.update(sd)
        return rng


class BufferGuard:
    """Puts back the buffers (BatchNorm running statistics) of the modules that run inside the
    context: :meth:`restore` does, and leaving the context does too (``on_error_only=True``: only
    when it is left by an exception other than a skipped fp16 step — the step guard of the
    wrappers, docs/design.md §5).

    * ``modules`` given: every buffer of those modules is snapshotted on entry, found without
      hooks, so a compiled model keeps one graph (docs/design.md §10.5);
    * ``modules=None``: each module is snapshotted the first time it runs inside the context, via
      a global forward pre-hook (which Dynamo cannot trace: the fallback when the modules are not
      known).

    A module may name more tensors its forward writes through a ``forward_written()`` method
    (the activation quantizer's step size, set by its first training batch); they are saved and
    restored with its buffers. Tensors in ``exclude`` are not saved (their owner keeps them
    unchanged until no error can follow).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module] | None = None,
        *,
        on_error_only: bool = False,
        exclude: Sequence[Tensor] = (),
    ) -> None:
        self.modules = modules
        self.on_error_only = on_error_only
        self.exclude = {id(t) for t in exclude}
        self.saved: dict[int, tuple[Tensor, Tensor]] = {}
        self.handle: Any = None

    def _save(self, module: nn.Module) -> None:
        # the module's own buffers (= buffers(recurse=False), without the generator machinery:
        # the hook runs for every module call of a wrapper's step)
        tensors = [b for b in module._buffers.values() if b is not None]
        written = getattr(module, "forward_written", None)
        if callable(written):
            tensors += list(written())
        for t in tensors:
            if id(t) not in self.exclude and id(t) not in self.saved:
                self.saved[id(t)] = (t, t.detach().clone())

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self._save(module)

    def restore(self) -> None:
        with torch.no_grad():
            for buf, copy in self.saved.values():
                buf.copy_(copy)

    def __enter__(self) -> BufferGuard:
        self.saved, self._seen = {}, set()
        if self.modules is None:
            self.handle = nn.modules.module.register_module_forward_pre_hook(self._pre_hook)
        else:
            for top in self.modules:
                for m in top.modules():
                    self._save(m)
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        error = exc_type is not None and not issubclass(exc_type, GradientOverflow)
        if error or not self.on_error_only:
            self.restore()
        self.saved = {}


@dataclass
class Snapshot:
    """Values of some parameters, their optimizer state and some buffers at one moment, and the
    RNG state (``None`` if not needed). All tensors are detached clones."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    buffers: list[Tensor]
    rng: RngState | None

    @classmethod
    def capture(
        cls, params: list[Tensor], optimizer: torch.optim.Optimizer, buffers: list[Tensor], with_rng: bool
    ) -> Snapshot:
        states = [{k: clone_value(v) for k, v in optimizer.state.get(p, {}).items()} for p in params]
        rng = RngState({p.device for p in params}, python=True) if with_rng else None
        return cls([p.detach().clone() for p in params], states, [b.detach().clone() for b in buffers], rng)

    @torch.no_grad()
    def restore(
        self,
        params: list[Tensor],
        optimizer: torch.optim.Optimizer,
        buffers: list[Tensor],
        *,
        state: bool = True,
    ) -> None:
        """Copy the values back (``state=False``: not the optimizer state) and reset the RNG."""
        for p, x in zip(params, self.params):
            p.copy_(x)
        for b, x in zip(buffers, self.buffers):
            b.copy_(x)
        if state:
            for p, st in zip(params, self.states):
                if st:
                    optimizer.state[p] = {k: clone_value(v) for k, v in st.items()}
                else:
                    optimizer.state.pop(p, None)
        if self.rng is not None:
            self.rng.restore()

    def nbytes(self) -> int:
        ts = (
            self.params + self.buffers + [v for s in self.states for v in s.values() if isinstance(v, Tensor)]
        )
        return sum(t.numel() * t.element_size() for t in ts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "states": self.states,
            "buffers": self.buffers,
            "rng": None if self.rng is None else self.rng.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> Snapshot:
        rng = None if sd["rng"] is None else RngState.from_state_dict(sd["rng"])
        return cls(list(sd["params"]), list(sd["states"]), list(sd["buffers"]), rng)


def captured_bytes(fn: Any, exclude: set[int], depth: int = 0) -> int:
    """Bytes of the tensors a closure captures (cells, defaults, ``functools.partial`` arguments;
    tuples / lists / dicts of them), excluding storages in ``exclude`` (the model's own tensors) —
    an estimate of what recording the closure keeps alive. Modules are not entered."""
    if depth > 4:
        return 0
    if isinstance(fn, Tensor):
        ptr = fn.untyped_storage().data_ptr()
        if ptr in exclude:
            return 0
        exclude.add(ptr)
        return fn.untyped_storage().nbytes()
    if isinstance(fn, (tuple, list)):
        return sum(captured_bytes(x, exclude, depth + 1) for x in fn)
    if isinstance(fn, dict):
        return sum(captured_bytes(x, exclude, depth + 1) for x in fn.values())
    if isinstance(fn, nn.Module):
        return 0
    parts: list[Any] = []
    if callable(fn):
        parts += [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _cell_filled(c)]
        parts += list(getattr(fn, "__defaults__", None) or ())
        parts += list((getattr(fn, "__kwdefaults__", None) or {}).values())
        parts += list(getattr(fn, "args", ()) or ()) + list((getattr(fn, "keywords", None) or {}).values())
    return sum(captured_bytes(x, exclude, depth + 1) for x in parts)


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
