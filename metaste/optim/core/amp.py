"""fp16 loss scaling, gradient clipping and gradient accumulation inside a wrapper's ``step``
(docs/design.md §5.1).

The wrappers run backward themselves, so ``GradScaler.step(opt)`` (which refuses closures) and
``clip_grad_norm_`` between backward and step have no place in the user's loop. Instead a wrapper
takes the scaler (``FOGZO(opt, grad_scaler=scaler)``, ``HyperSTE(opt, grad_scaler=scaler)``) and
``max_grad_norm``, and one ``step(closure)`` runs the protocol of a hand-written fp16 loop::

    loss = closure();  scaler.scale(loss).backward()          # per micro-batch (iterable closures)
    scaler.unscale_(optimizer)                                 # before any estimator math
    if an unscaled gradient is inf/NaN:                        # exactly GradScaler.step's test
        scaler.update(); return loss                           # nothing else changes: no extra
                                                               # passes, no θ update, no counter
    FOGZO: clip_grad_norm_(params, max_grad_norm)              # the backprop gradient, not G
    estimator (FOGZO's ĝ, c_i, G; HyperSTE's hypergradients and g ⊙ ψ)
    HyperSTE: clip_grad_norm_(params, max_grad_norm)           # g ⊙ ψ, right before the base step
    optimizer.step(); scaler.update()

With a plain-STE setting (FOGZO ``ste_fraction=1``, HyperSTE ``hyper_lr=0``) this is, operation
for operation, ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``. A
``scaler.step(wrapper)`` in the user's loop goes to the wrapper (:func:`install_grad_scaler_guard`):
torch's own step for a one-forward method, an error that points to ``grad_scaler=`` otherwise.

:class:`Accumulated` is one optimizer step's micro-batches as one re-callable closure in the
wrappers' micro-batch form (it returns a generator of losses): backward runs per micro-batch, with
weights and optionally under ``no_sync`` for all but the last; the trainer integrations build it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Accumulated", "GradientOverflow", "check_grad_scaler", "found_inf", "install_grad_scaler_guard"]


class GradientOverflow(Exception):
    """Raised inside a wrapper's step when the scaler found inf/NaN gradients; the wrapper catches
    it, updates the scale and returns ``loss`` without changing anything else."""

    def __init__(self, loss: Tensor) -> None:
        super().__init__("inf/NaN gradients: step skipped")
        self.loss = loss


def check_grad_scaler(scaler: Any, who: str) -> Any:
    """``scaler`` if it is usable as a ``torch.amp.GradScaler`` (``None`` passes), else ``TypeError``."""
    if scaler is None:
        return None
    needed = ("scale", "unscale_", "update", "is_enabled")
    if not all(callable(getattr(scaler, n, None)) for n in needed):
        raise TypeError(
            f"{who}(grad_scaler=...) takes a torch.amp.GradScaler (e.g. torch.amp.GradScaler('cuda')), "
            f"got {type(scaler).__name__}"
        )
    return scaler


def found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` found an inf/NaN gradient (GradScaler.step's test)."""
    per_device = scaler._found_inf_per_device(optimizer)
    return bool(sum(float(v) for v in per_device.values()))


def install_grad_scaler_guard(wrapper: type) -> None:
    """Make ``GradScaler.step(w, ...)`` call ``w._grad_scaler_step`` for an instance ``w`` of
    ``wrapper`` (:class:`~metaste.optim.core.wrapper.OptimizerWrapper`): torch's step for a one-forward
    method, else a metaste error that says what to do instead of a failure inside torch on its
    ``_scale is None`` assertion. Other optimizers are untouched."""
    cls = torch.amp.GradScaler
    if getattr(cls.step, "_metaste_guard", False):
        return
    original = cls.step

    @functools.wraps(original)
    def step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(optimizer, wrapper):
            return optimizer._grad_scaler_step(self, *args, **kwargs)
        return original(self, optimizer, *args, **kwargs)

    step._metaste_guard = True  # type: ignore[attr-defined]
    step._metaste_original = original  # type: ignore[attr-defined]
    cls.step = step  # type: ignore[method-assign]


class Accumulated:
    """The micro-batches of one optimizer step as one closure.

    ``Accumulated(closures, weights=None, no_sync=None)``: ``closures`` are zero-argument callables
    returning a scalar loss (each bound to its own micro-batch); ``weights`` default to 1/k (the
    mean over k micro-batches); ``no_sync`` is a zero-argument context-manager factory (e.g.
    ``lambda: ddp_model.no_sync()``) entered around the forward and backward of all but the last
    micro-batch.

    Calling it returns a generator of the weighted micro-batch losses w_i·L_i — the wrappers'
    micro-batch closure form (docs/design.md §5): inside ``step`` each is backpropagated as soon as
    it is produced (one micro-batch's graph alive at a time), and the step's loss is Σ w_i L_i;
    FOGZO's perturbed passes sum them under ``no_grad``. Each closure is called exactly once per
    evaluation, in order.
    """

    def __init__(
        self,
        closures: Sequence[Callable[[], Tensor]],
        weights: Sequence[float] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        closures = list(closures)
        if not closures or not all(callable(c) for c in closures):
            raise ValueError("Accumulated needs a non-empty list of zero-argument closures")
        if weights is None:
            weights = [1.0 / len(closures)] * len(closures)
        weights = [float(w) for w in weights]
        if len(weights) != len(closures):
            raise ValueError(f"Accumulated got {len(closures)} closures but {len(weights)} weights")
        self.closures, self.weights, self.no_sync = closures, weights, no_sync

    def __len__(self) -> int:
        return len(self.closures)

    def __call__(self) -> Iterator[Tensor]:
        return self._losses()

    def _losses(self) -> Iterator[Tensor]:
        last = len(self.closures) - 1
        for i, (c, w) in enumerate(zip(self.closures, self.weights)):
            sync_off = self.no_sync is not None and i < last and torch.is_grad_enabled()
            with self.no_sync() if sync_off else contextlib.nullcontext():  # type: ignore[misc]
                yield c() * w  # the wrapper's backward runs while this generator waits here
