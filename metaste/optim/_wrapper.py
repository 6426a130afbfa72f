"""What FOGZO and HyperSTE share (docs/design.md §5): param_groups/state sharing, closure checks,
state_dict nesting.

A wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups`` list and ``state`` dict are
the wrapped optimizer's own objects, so LR schedulers, ``zero_grad`` and ``add_param_group``
work on either. ``state`` holds only what the base optimizer puts there (per-parameter
tensors), so the usual "move the optimizer state to a device" loop keeps working; everything
the wrapper keeps (step counters, history, schedules, hyper-optimizer state) goes under
``state_dict()["metaste"]`` via :meth:`_wrapper_state_dict`: one ``state_dict()`` saves
everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .amp import Accumulated, GradientOverflow, check_grad_scaler, found_inf

__all__ = ["OptimizerWrapper", "NonFiniteLossError", "Closure"]

Closure = Callable[[], Tensor]


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or ±inf; no weight was changed."""


class OptimizerWrapper(Optimizer):
    """Base class of metaste's optimizer wrappers. Subclasses implement :meth:`step`."""

    def __init__(
        self, optimizer: Optimizer, *, grad_scaler: Any = None, max_grad_norm: float | None = None
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}; build the base optimizer first, e.g. "
                f"{type(self).__name__}(torch.optim.SGD(model.parameters(), lr=0.1))"
            )
        if isinstance(optimizer, OptimizerWrapper):
            raise TypeError(f"cannot wrap a metaste wrapper ({type(optimizer).__name__}) again")
        # Optimizer.__init__ sets up hooks and bookkeeping (our add_param_group is a no-op
        # until self.optimizer exists); then share the base optimizer's own list and state.
        super().__init__(optimizer.param_groups, {})
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        # fp16 loss scaling and clipping inside step (docs/design.md §5.1, optim/amp.py)
        self.grad_scaler = check_grad_scaler(grad_scaler, type(self).__name__)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}; it must be > 0 (or None: no clipping)")
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None  # the pre-clip norm of the last clipped step
        self.last_step_skipped = False  # the scaler found inf/NaN gradients in the last step
        self._in_step = False
        self._unscaled = False
        optimizer.register_step_pre_hook(self._before_base_step)

    # -- torch.optim.Optimizer plumbing ------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Delegates to the base optimizer (its defaults fill the group); the list is shared."""
        if not hasattr(self, "optimizer"):  # called from Optimizer.__init__: groups exist
            return
        self.optimizer.add_param_group(param_group)

    def params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` (which holds the per-parameter wrapper state)
        plus ``"metaste"``: the wrapper's own state."""
        sd = self.optimizer.state_dict()
        sd["metaste"] = self._wrapper_state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        wrapper_sd = sd.pop("metaste", None)
        if wrapper_sd is None:
            raise ValueError(
                f"state_dict has no 'metaste' entry: it was not saved by {type(self).__name__}; "
                "load a bare optimizer's state with wrapper.optimizer.load_state_dict(...)"
            )
        self.optimizer.load_state_dict(sd)
        # load_state_dict rebinds the base optimizer's state dict: share it again
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups
        self._load_wrapper_state_dict(wrapper_sd)

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {}

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    # -- closures ----------------------------------------------------------------------------

    def _zero_grads(self) -> None:
        for p in self.params():
            p.grad = None

    def _evaluate(self, closure: Closure | None, *, backward: bool = True) -> Tensor:
        """Zero the gradients, call ``closure``, check what it returns, run ``backward`` and return
        the detached loss. ``backward=False`` (FOGZO's n-SPSA clean pass, where nothing needs a
        gradient) runs the closure under ``no_grad`` and skips backward. An :class:`~.amp.Accumulated`
        closure runs backward per micro-batch.

        Raises a clear error — before any weight changes — for a missing closure, a non-tensor
        or non-scalar return, a closure that ran backward itself and a non-finite loss. With a
        ``grad_scaler`` the backward is on the scaled loss, the gradients are unscaled, and
        inf/NaN gradients raise :class:`~.amp.GradientOverflow` (the step is skipped, like
        ``GradScaler.step``); a non-finite loss is then left to that test, as in a hand-written loop.
        """
        who = type(self).__name__
        check_closure(closure, who)
        self._zero_grads()
        scaler = self._active_scaler()
        if backward and isinstance(closure, Accumulated):
            loss = closure.forward_backward(
                lambda raw: self._check_loss_for_backward(raw, who), lambda part: self._backward(part, scaler)
            )
            if scaler is None and not math.isfinite(loss.item()):
                self._zero_grads()
                raise NonFiniteLossError(
                    f"the micro-batches returned a non-finite loss ({loss.item()}); no weight was changed"
                )
        else:
            with torch.enable_grad() if backward else torch.no_grad():
                loss = closure()
            check_loss(loss, who)
            if any(p.grad is not None for p in self.params()):
                self._zero_grads()
                raise RuntimeError(
                    f"the closure passed to {who}.step() called backward() itself; "
                    "it must only return the loss: opt.step(lambda: loss_fn(model(x), y)) — "
                    "the wrapper runs backward (and the extra passes) for you"
                )
            if (scaler is None or not backward) and not math.isfinite(loss.item()):
                raise NonFiniteLossError(
                    f"the closure returned a non-finite loss ({loss.item()}); no weight was changed. "
                    "Lower the learning rate or check the data for NaN/inf"
                )
            if backward:
                self._check_loss_for_backward(loss, who)
                self._backward(loss, scaler)
        if backward and scaler is not None:
            scaler.unscale_(self.optimizer)
            self._unscaled = True
            if found_inf(scaler, self.optimizer):
                raise GradientOverflow(loss.detach())
        return loss.detach()

    @staticmethod
    def _check_loss_for_backward(loss: object, who: str) -> None:
        check_loss(loss, who)
        if not loss.requires_grad:  # type: ignore[union-attr]
            raise ValueError(
                "the loss returned by the closure does not require grad (was it computed "
                "under torch.no_grad(), or are all parameters frozen?)"
            )

    @staticmethod
    def _backward(loss: Tensor, scaler: Any) -> None:
        with torch.enable_grad():
            (loss if scaler is None else scaler.scale(loss)).backward()

    # -- fp16 loss scaling and clipping (docs/design.md §5.1) ------------------------------

    def _active_scaler(self) -> Any:
        s = self.grad_scaler
        return s if s is not None and s.is_enabled() else None

    def _run_step(self, step: Callable[[Closure | None], Tensor], closure: Closure | None) -> Tensor:
        """Run one wrapper step ``step(closure)`` under the scaler protocol of optim/amp.py: an
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


def check_closure(closure: Closure | None, who: str) -> None:
    if closure is None:
        raise ValueError(
            f"{who}.step() needs a closure that returns the loss without calling backward: "
            "loss = opt.step(lambda: loss_fn(model(x), y))"
        )
    if not callable(closure):
        raise TypeError(f"{who}.step(closure): closure must be callable, got {type(closure)}")


def check_loss(loss: object, who: str) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"the closure passed to {who}.step() must return the loss as a torch.Tensor, "
            f"got {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"the closure passed to {who}.step() must return a scalar loss, got shape "
            f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean())"
        )
