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

__all__ = ["OptimizerWrapper", "NonFiniteLossError", "Closure"]

Closure = Callable[[], Tensor]


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or ±inf; no weight was changed."""


class OptimizerWrapper(Optimizer):
    """Base class of metaste's optimizer wrappers. Subclasses implement :meth:`step`."""

    def __init__(self, optimizer: Optimizer) -> None:
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
        gradient) runs the closure under ``no_grad`` and skips backward.

        Raises a clear error — before any weight changes — for a missing closure, a non-tensor
        or non-scalar return, a closure that ran backward itself and a non-finite loss.
        """
        check_closure(closure, type(self).__name__)
        self._zero_grads()
        with torch.enable_grad() if backward else torch.no_grad():
            loss = closure()
        check_loss(loss, type(self).__name__)
        if any(p.grad is not None for p in self.params()):
            self._zero_grads()
            raise RuntimeError(
                f"the closure passed to {type(self).__name__}.step() called backward() itself; "
                "it must only return the loss: opt.step(lambda: loss_fn(model(x), y)) — "
                "the wrapper runs backward (and the extra passes) for you"
            )
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"the closure returned a non-finite loss ({loss.item()}); no weight was changed. "
                "Lower the learning rate or check the data for NaN/inf"
            )
        if backward:
            if not loss.requires_grad:
                raise ValueError(
                    "the loss returned by the closure does not require grad (was it computed "
                    "under torch.no_grad(), or are all parameters frozen?)"
                )
            with torch.enable_grad():
                loss.backward()
        return loss.detach()


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
