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
from torch.optim import Optimizer

from .closure import Closure

__all__ = [
    "Accumulated",
    "GradientOverflow",
    "ScaledStep",
    "check_grad_scaler",
    "found_inf",
    "install_grad_scaler_guard",
]


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


class ScaledStep:
    """The part of :class:`~metaste.optim.core.wrapper.OptimizerWrapper` that runs a step under a
    ``GradScaler`` and clips (the protocol above): the scaler and clip value, the step run under
    the scaler, the unscale with its overflow test, the clip, and ``scaler.step(wrapper)``."""

    optimizer: torch.optim.Optimizer
    grad_scaler: Any
    max_grad_norm: float | None
    last_grad_norm: Tensor | None
    last_step_skipped: bool
    _in_step: bool
    _unscaled: bool

    def configure_amp(self, *, grad_scaler: Any = None, max_grad_norm: float | None = None) -> None:
        """Set the ``GradScaler`` and the clip value (the constructor's ``grad_scaler=`` and
        ``max_grad_norm=``; the trainer integrations call it with the framework's). ``None``
        turns either off."""
        who = type(self).__name__
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}; it must be > 0 (or None: no clipping)")
        self.grad_scaler = check_grad_scaler(grad_scaler, who)
        self.max_grad_norm = max_grad_norm

    def _active_scaler(self) -> Any:
        s = self.grad_scaler
        return s if s is not None and s.is_enabled() else None

    def _run_step(self, step: Callable[[Closure | None], Tensor], closure: Closure | None) -> Tensor:
        """Run one wrapper step ``step(closure)`` under the scaler protocol above: an
        overflow skips it (only the scale changes), ``scaler.update()`` ends it."""
        self._in_step, self._unscaled, self.last_step_skipped = True, False, False
        try:
            loss = step(closure)
        except GradientOverflow as overflow:
            loss, self.last_step_skipped = overflow.loss, True
        finally:
            self._in_step = False
            if self._unscaled:  # also after an error, so that the scaler stays usable
                self._unscaled = False
                self.grad_scaler.update()
        return loss

    #: where ``max_grad_norm`` clips: right before the base update (the surrogate gradient
    #: g ⊙ ψ, HyperSTE), or — False — where the subclass calls :meth:`_clip` (FOGZO: the
    #: backprop gradient, before its zeroth-order estimate replaces it)
    _clip_before_base_step = True

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            grads = [p for p in self.params() if p.grad is not None]
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)

    def _before_base_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Step pre-hook of the base optimizer: clip right before the base update, only inside
        this wrapper's own step."""
        if self._in_step and self._clip_before_base_step:
            self._clip()

    def _unscale(self, scaler: Any, loss: Tensor | None) -> None:
        scaler.unscale_(self.optimizer)
        self._unscaled = True
        if found_inf(scaler, self.optimizer):
            raise GradientOverflow(loss)

    def _grad_scaler_step(self, scaler: Any, *args: Any, **kwargs: Any) -> Any:
        """What ``scaler.step(wrapper, ...)`` does (:func:`install_grad_scaler_guard`): torch's
        own ``GradScaler.step`` (unscale, skip on inf/NaN, else ``wrapper.step()``) for a method that
        needs one forward; an error that says what to do for one that needs more."""
        who = type(self).__name__
        why = self._closure_reason()
        if why:
            raise RuntimeError(
                f"scaler.step({who}, ...) is not supported: {who} needs a closure {why}, so a GradScaler "
                f"cannot unscale the gradients in between. Give the scaler to the wrapper instead — "
                f"{who}(base, ..., grad_scaler=scaler) — and call loss = opt.step(closure) with a closure that "
                "returns the unscaled loss; it scales, unscales, skips overflow steps and updates the scale "
                "(docs/design.md §5.1)"
            )
        own, self.grad_scaler = self.grad_scaler, None  # the caller's scaler unscales and checks inf
        try:
            return torch.amp.GradScaler.step._metaste_original(scaler, self, *args, **kwargs)  # type: ignore[attr-defined]
        finally:
            self.grad_scaler = own


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
