"""``torch.compile`` for metaste's element-wise passes (docs/design.md §4.5).

:func:`kernel` compiles a Python function of tensors once (dynamic shapes, one graph) and runs it,
or runs the function itself where compiling cannot help or cannot work. Every compiled function
is also the eager path: the same torch ops in the same order, so both give the same values (the
callers' tests check them bit for bit). Used by FOGZO's noise passes, HyperSTE's analytical rule
and the quantizers' backward (:mod:`metaste.quant._functions`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FUSE_MIN", "RECOMPILE_LIMIT", "kernel", "compilable"]

#: the passes are compiled for tensors of at least this many elements (below it, the compile
#: time and Dynamo's ~50–100 µs per call outweigh the gain)
FUSE_MIN = 1 << 16

#: the recompile limit while a kernel runs: each weight shape may compile its own variant
RECOMPILE_LIMIT = 64

#: ``METASTE_FUSED=0`` in the environment turns every compiled pass off (the eager ops, the same
#: values): for a machine without a C++ compiler or Triton, or to skip the first calls' compiles
ENABLED = os.environ.get("METASTE_FUSED", "1") != "0"

_COMPILED: dict[str, Any] = {}
_SOURCES: dict[str, Callable[..., Any]] = {}
_BROKEN: list[str] = []  # a compile that failed once is not retried (the eager path gives the same values)


def compilable(*tensors: Tensor) -> bool:
    """Whether a kernel may run compiled on ``tensors`` now: plain tensors (not a subclass such as
    DTensor or a fake tensor, not under a torch.func transform), outside an enclosing
    ``torch.compile`` (which traces the eager function into its own graph), outside a torch
    dispatch or function mode, and not where autograd records them (a double backward needs the
    eager ops)."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False  # a user's mode (a FLOP counter, a debugging mode) sees the eager ops
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(type(t) in (Tensor, torch.nn.Parameter) and not is_wrapped(t) for t in tensors)


def kernel(fn: Callable[..., Any], kind: str, fused: bool) -> Callable[..., Any]:
    """``fn`` compiled by ``torch.compile`` (dynamic shapes) when ``fused`` and the kind allows it,
    else ``fn`` itself. A kernel that fails to compile warns once and runs eagerly from then on."""
    if not fused or kind == "tanh" or _BROKEN or not ENABLED:
        return fn
    name = fn.__name__
    if _SOURCES.setdefault(name, fn) is not fn:  # the compiled functions are kept by name
        raise ValueError(f"two kernels named {name!r}: {_SOURCES[name].__module__} and {fn.__module__}")
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    compiled = _COMPILED[name]

    def run(*args: Any) -> Any:
        if _BROKEN:
            return fn(*args)
        try:
            # one variant per weight shape (Dynamo specialises these shapes): a model has more
            # shapes than the default limit of 8, past which a fullgraph kernel fails.
            # Set and reset by hand: config.patch costs ~1 ms a call, a plain attribute µs.
            cfg = torch._dynamo.config
            limit = cfg.recompile_limit
            cfg.recompile_limit = max(RECOMPILE_LIMIT, limit)
            try:
                return compiled(*args)
            finally:
                cfg.recompile_limit = limit
        except Exception as err:  # no C++ compiler, no Triton, an unsupported device, ...
            _BROKEN.append(repr(err))
            warnings.warn(
                f"metaste could not compile its fused passes ({type(err).__name__}: {err}); running them "
                "eagerly, with the same numbers (FOGZO: pass fused=False to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )
            return fn(*args)

    return run
