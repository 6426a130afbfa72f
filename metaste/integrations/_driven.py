"""What the trainer integrations share: the facade a framework holds as "its" optimizer while the
integration drives the metaste wrapper's ``step(closure)`` itself, and the wrapper check."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from ..optim import OptimizerWrapper

__all__ = ["DrivenOptimizer", "check_wrapper"]


def check_wrapper(optimizer: Any, where: str, setups: str) -> OptimizerWrapper:
    """``optimizer`` if it is a metaste wrapper, else a ``TypeError`` naming the supported ``setups``."""
    if isinstance(optimizer, DrivenOptimizer):
        return optimizer.wrapper
    if not isinstance(optimizer, OptimizerWrapper):
        raise TypeError(
            f"{where} drives a metaste optimizer wrapper (metaste.FOGZO / metaste.HyperSTE), got "
            f"{type(optimizer).__name__ if optimizer is not None else 'no optimizer'}. Supported: {setups}"
        )
    return optimizer


class DrivenOptimizer(Optimizer):
    """What a framework sees as its optimizer: ``param_groups``, ``state``, ``state_dict`` and
    ``zero_grad`` are the wrapper's (so LR schedulers and checkpoints work), but ``step()`` without
    a closure does nothing: the integration has already run ``wrapper.step(closure)`` for this
    optimizer step (and says so with :meth:`mark_stepped`; a ``step()`` without one raises)."""

    def __init__(self, wrapper: OptimizerWrapper, where: str) -> None:  # no Optimizer.__init__: all delegated
        self.wrapper = wrapper
        self.where = where
        self._stepped = False

    # everything an Optimizer holds is the wrapper's (the base optimizer's lists are rebound by
    # load_state_dict, so never keep a reference)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.wrapper.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.wrapper.param_groups = self.wrapper.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.wrapper.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.wrapper.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.wrapper.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.wrapper.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.wrapper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapper.load_state_dict(state_dict)

    def mark_stepped(self) -> None:
        self._stepped = True

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            return self.wrapper.step(closure)
        if not self._stepped:
            raise RuntimeError(
                f"{self.where}: the framework called optimizer.step() but no metaste step ran for this "
                "optimizer step; the integration runs wrapper.step(closure) itself. Do not override its "
                "training step, or call wrapper.step(closure) yourself"
            )
        self._stepped = False
        return None

    def __repr__(self) -> str:
        return f"DrivenOptimizer({self.wrapper!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def grad_norm(params: Any) -> torch.Tensor:
    """The total 2-norm of the gradients of ``params`` (no clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)
