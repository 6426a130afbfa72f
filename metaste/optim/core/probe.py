"""The zeroth-order passes of one step, shared by FOGZO and the calibrated surrogate's probe steps
(docs/design.md §4.5, §9): the closure evaluated again at perturbed weights, each pass under the
clean pass's random state (the same dropout masks, the same batch a closure draws), the buffers
(BatchNorm statistics) put back after every pass, and the RNG and the gradients as the clean pass
left them at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .closure import Closure, closure_value
from .fsdp import reshard
from .snapshot import BufferGuard, RngState

__all__ = ["Probe"]


class Probe:
    """Build it right before the clean pass (it records the RNG state the passes replay); call
    :meth:`clean_pass_done` after it; then ``with probe.passes(closure, ...) as loss_at:`` gives
    ``loss_at()``, the closure's loss at the weights as they are, for the estimator to call."""

    def __init__(self, weights: Iterable[Tensor]) -> None:
        self.devices = {p.device for p in weights}
        self.rng_before = RngState(self.devices)
        self.rng_after: RngState | None = None
        self.grads: list[tuple[Tensor, Tensor | None]] = []

    def clean_pass_done(self, params: Iterable[Tensor]) -> None:
        """Record the RNG and the gradients the clean pass left: the passes give them back."""
        self.rng_after = RngState(self.devices)
        self.grads = [(p, p.grad) for p in params]

    @contextmanager
    def passes(
        self, closure: Closure, who: str, modules: list[nn.Module], reshard_between: bool = False
    ) -> Iterator[Callable[[], float]]:
        """``loss_at`` for the perturbed passes. ``modules``: whose buffers to put back (found by
        the step guard; empty: a forward hook finds them). ``reshard_between``: FSDP2 — reshard
        ``modules`` after each pass, so that the next one gathers the next perturbation."""
        assert self.rng_after is not None, "call clean_pass_done() after the clean pass"
        with torch.no_grad(), BufferGuard(modules or None) as buffers:

            def loss_at() -> float:
                self.rng_before.restore()
                value = closure_value(closure, who)
                if reshard_between:
                    reshard(modules)
                buffers.restore()
                return value

            try:
                yield loss_at
            finally:
                self.rng_after.restore()
                for p, g in self.grads:  # a closure that zeroes grads (set_to_none) cannot lose them
                    p.grad = g
