"""HF Accelerate with a metaste wrapper (docs/design.md §10.3). Extra ``[hf]``.

``accelerator.prepare(model, wrapper)`` alone wraps the wrapper in an ``AcceleratedOptimizer``
whose ``step(closure)`` drops the closure of every micro-batch but the last one of a gradient
accumulation window (they are never evaluated: their gradients are lost) and, under fp16, hands
it to ``GradScaler.step``, which refuses closures. :func:`prepare` fixes both: it calls
``accelerator.prepare`` and turns each prepared metaste optimizer into a
:class:`MetasteAcceleratedOptimizer`, whose ``step(closure)`` records the closure and, on the
window's last micro-batch (``accelerator.sync_gradients``), runs ``wrapper.step(Accumulated(...))``
over the window — backward per micro-batch with weight 1/``gradient_accumulation_steps`` (what
``accelerator.backward`` divides by) under ``accelerator.no_sync`` — with the accelerator's
``GradScaler``. Change to an Accelerate script::

    model, opt = metaste.integrations.accelerate.prepare(accelerator, model, metaste.FOGZO(base, ...))
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = opt.step(lambda x=x, y=y: loss_fn(model(x), y))   # None until the window's last

The closures of a window are evaluated at its end, so each must bind its own batch
(``lambda x=x, y=y: ...`` or ``functools.partial``); a closure whose captured variables changed
since it was recorded raises an error naming them. ``step`` returns ``None`` inside a window and
Σ L_i / ``gradient_accumulation_steps`` at its end; the prepared schedulers skip an fp16 overflow
step (``step_was_skipped``). Clip with the wrapper's ``max_grad_norm``, not
``accelerator.clip_grad_norm_``. Supported: one process or DDP, fp32 / bf16 / fp16. Refused:
DeepSpeed, Megatron-LM, FSDP (see docs/design.md §10.4 for FSDP2 in your own loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..optim import Accumulated, OptimizerWrapper
from . import require

_acc = require("accelerate", "hf", "metaste.integrations.accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

__all__ = ["prepare", "MetasteAcceleratedOptimizer", "SUPPORTED"]

SUPPORTED = (
    "metaste.integrations.accelerate.prepare(accelerator, model, metaste.FOGZO(base) or metaste.HyperSTE(base), "
    "...) on one process or DDP, in fp32, bf16 or fp16, with any gradient_accumulation_steps"
)


def prepare(accelerator: Any, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)``, with every metaste wrapper among the results
    turned into a :class:`MetasteAcceleratedOptimizer` (same object, so prepared schedulers and
    ``accelerator.save_state`` keep working). Returns what ``accelerator.prepare`` returns."""
    if accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.MEGATRON_LM,
        DistributedType.FSDP,
    ):
        raise ValueError(
            f"metaste.integrations.accelerate cannot run with {accelerator.distributed_type.value} (it owns "
            f"backward, loss scaling and the optimizer step). Supported: {SUPPORTED}"
        )
    if not any(isinstance(o, OptimizerWrapper) for o in objects):
        raise TypeError(
            "metaste.integrations.accelerate.prepare got no metaste optimizer wrapper (metaste.FOGZO / "
            f"metaste.HyperSTE) among {[type(o).__name__ for o in objects]}. Supported: {SUPPORTED}"
        )
    out = accelerator.prepare(*objects, **kwargs)
    models = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.nn.Module)]
    for o in out if isinstance(out, tuple) else (out,):
        if isinstance(o, AcceleratedOptimizer) and isinstance(o.optimizer, OptimizerWrapper):
            o.__class__ = MetasteAcceleratedOptimizer
            o._metaste_init(accelerator, models)
    return out


class MetasteAcceleratedOptimizer(AcceleratedOptimizer):
    """An ``AcceleratedOptimizer`` over a metaste wrapper (made by :func:`prepare`); ``step(closure)``
    runs the wrapper once per gradient-accumulation window (see the module docstring)."""

    def _metaste_init(self, accelerator: Any, models: list[torch.nn.Module]) -> None:
        self._metaste_accelerator = accelerator
        self._metaste_models = models
        self._metaste_window: list[_Recorded] = []

    @property
    def metaste_optimizer(self) -> OptimizerWrapper:
        return self.optimizer

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is None or not callable(closure):
            raise TypeError(
                "a prepared metaste optimizer steps on a closure that returns the loss (no backward): "
                "loss = opt.step(lambda x=x, y=y: loss_fn(model(x), y)) inside accelerator.accumulate(model)"
            )
        self._metaste_window.append(_Recorded(closure))
        if not self.gradient_state.sync_gradients:
            return None
        window, self._metaste_window = self._metaste_window, []
        for i, rec in enumerate(window):
            rec.check(i, len(window))
        acc = self._metaste_accelerator
        wrapper = self.optimizer
        if self.scaler is not None:
            wrapper.configure_amp(grad_scaler=self.scaler, max_grad_norm=wrapper.max_grad_norm)
        weight = 1.0 / acc.gradient_accumulation_steps
        loss = wrapper.step(
            Accumulated([r.closure for r in window], weights=[weight] * len(window), no_sync=self._no_sync)
        )
        self._is_overflow = wrapper.last_step_skipped
        return loss

    def _no_sync(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for m in self._metaste_models:
            stack.enter_context(self._metaste_accelerator.no_sync(m))
        return stack


class _Recorded:
    """A closure and what its free variables held when it was recorded."""

    def __init__(self, closure: Callable[[], torch.Tensor]) -> None:
        self.closure = closure
        cells = getattr(closure, "__closure__", None) or ()
        names = getattr(getattr(closure, "__code__", None), "co_freevars", ())
        self.cells = [(n, c, _contents(c)) for n, c in zip(names, cells)]

    def check(self, i: int, n: int) -> None:
        changed = [name for name, cell, was in self.cells if _contents(cell) is not was]
        if changed:
            raise ValueError(
                f"the closure of micro-batch {i + 1} of {n} in this accumulation window captured "
                f"{', '.join(repr(c) for c in changed)}, which changed before the window ended (its closure "
                "is evaluated then, with the whole window); bind the batch: "
                f"opt.step(lambda {', '.join(f'{c}={c}' for c in changed)}: ...) or functools.partial"
            )


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return None
