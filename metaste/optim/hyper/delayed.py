"""``method="delayed"``: θ frozen over windows of k steps, one-step hypergradients from inside the
window applied at the next window (thesis A.2, docs/design.md §3.2). Any optimizer, any learnable
ψ, any granularity; the hypergradient is :func:`~metaste.optim.hyper.diffopt.one_step_hypergradient`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..core.closure import Closure
from ._common import Evaluate, HyperMethod, ManagedWeight, PendingStep
from ._options import HyperOptimizerSpec, MethodOptions, resolve_hyper_optimizer, runs

__all__ = ["Delayed", "DelayedMethod", "ACCUMULATE"]

ACCUMULATE = ("first", "sum", "mean")


@dataclass(frozen=True)
class Delayed(MethodOptions):
    """Options of ``method="delayed"`` (docs/design.md §3.2, thesis A.2). Common options:
    :class:`~metaste.optim.hyper._options.MethodOptions` (``boundary`` defaults to ``"none"``,
    what autograd differentiates).

    Args:
        window: k ≥ 2 steps per window (default 2).
        accumulate: ``"first"`` (default, the thesis: the first pair of each window), ``"sum"``
            or ``"mean"`` over the k−1 within-window pairs.
        hyper_optimizer: the optimizer of θ: a ``torch.optim.Optimizer`` class, a callable
            ``(params, lr=..., **kwargs)`` or a torch.optim name (``"adam"``), built over leaf
            copies of the surrogate parameters with ``lr=hyper_lr``. Default ``None``: plain SGD,
            θ ← θ − η_a·h (thesis A.1). Its state is in ``state_dict()``.
        hyper_optimizer_kwargs: extra arguments of ``hyper_optimizer`` (default none).
    """

    name = "delayed"

    window: int = 2
    accumulate: str = "first"
    hyper_optimizer: HyperOptimizerSpec = None
    hyper_optimizer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or w < 2:
            raise ValueError(
                f"Invalid window: {w!r}; delayed updates need an int >= 2 (θ must stay frozen "
                "for at least one pair of steps)"
            )
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"Invalid accumulate: {self.accumulate!r}; choose 'first', 'sum' or 'mean'")
        object.__setattr__(self, "hyper_optimizer", resolve_hyper_optimizer(self.hyper_optimizer))
        object.__setattr__(self, "hyper_optimizer_kwargs", dict(self.hyper_optimizer_kwargs or {}))


@runs(Delayed)
class DelayedMethod(HyperMethod):
    """Step t at position j = t mod k of its window [w, w+k−1] (docs/design.md §3.2)::

        λ_t = g_t ⊙ ψ(u_t; θ)                              (p.grad for the base step)
        if a pair (t−1, t) was recorded:                   (θ_t = θ_{t−1} inside the window)
            h += ⟨λ_t, ∂v_t/∂θ⟩   (one_step_hypergradient)
        record step t if j < k−1 and (accumulate != "first" or j = 0)
        base step
        if j = k−1:  θ ← clamp(hyper_opt step on h (÷(k−1) for "mean"), a_min, a_max)

    The record holds v_t, g_t, u_t and the optimizer state before step t (no graph), so a
    checkpoint between two steps of a window resumes exactly.
    """

    opts: Delayed
    writes_theta_last = True  # θ changes in after_update only

    def __init__(
        self, optimizer: Optimizer, managed: list[ManagedWeight], opts: Delayed, model: nn.Module | None
    ) -> None:
        super().__init__(optimizer, managed, opts, model)
        # the hyper-optimizer trains leaves that alias the surrogate buffers inside after_update
        # only (no θ copy); otherwise their data is an empty tensor (the objects, the
        # optimizer's keys, stay)
        self.leaves = [t.detach().clone() for t in self.tensors]
        factory = opts.hyper_optimizer or torch.optim.SGD
        self.hyper_opt = factory(self.leaves, lr=opts.hyper_lr, **opts.hyper_optimizer_kwargs)
        self._release_leaves()
        self.pending: PendingStep | None = None
        # the window's accumulated h; None: nothing added yet (zeros, allocated at the first pair)
        self.h: list[Tensor | None] = [None] * len(self.tensors)
        self.pairs = 0
        self.skipped = 0  # windows whose hypergradient was not finite (θ left unchanged)
        # the last applied h: a diagnostic (nothing reads it back, checkpoints do not hold it),
        # released at the start of the step that applies the next one so that the two never
        # coexist; empty until a window ends
        self.hypergrad: list[Tensor] = []

    def step(self, closure: Closure | None, evaluate: Evaluate, t: int) -> Tensor:
        if t % self.opts.window == self.opts.window - 1:
            # this step applies the next h: the last one is released before the backward pass,
            # where the pending record makes the window's peak (a step that raises leaves it
            # empty; the trajectory does not depend on it)
            self.hypergrad = []
        return super().step(closure, evaluate, t)

    def before_update(self, step: int) -> None:
        o = self.opts
        pos = step % o.window
        lam, raw = self.surrogate_grads(compact=True)  # u_t as SLSTE's code: θ is frozen until used
        record = pos < o.window - 1 and (o.accumulate != "first" or pos == 0)
        if not record:
            raw = None  # u_t is not kept: one weight copy less during the hypergradient
        # λ_t becomes p.grad now: the raw g_t it replaces is freed before the hypergradient (kept
        # in ``raw`` only for the record)
        for i, g in lam.items():
            self.managed[i].set_grad(g)
        if self.pending is not None:
            # consumed: its g_t, u_t are dropped from it as they are used (one_step_hypergradient)
            for k, h in self.pending_hypergradient(self.pending, lam):
                acc = self.h[k]
                if acc is not None:
                    acc += h
                elif h.shape == self.tensors[k].shape:  # h is the method's own: 0 + h in its buffer
                    self.h[k] = h.add_(0.0)  # (x + 0 = 0 + x exactly, −0 included)
                else:
                    self.h[k] = torch.zeros_like(self.tensors[k]).add_(h)
            self.pairs += 1
        self.pending = self.record_pending(raw, compact=True) if record else None
        del raw

    def after_update(self, step: int) -> None:
        if step % self.opts.window != self.opts.window - 1:
            return
        h = self._accumulated()
        if self.opts.accumulate == "mean" and self.pairs:
            h = [x / self.pairs for x in h]
        self.hypergrad = h
        # the leaves alias the buffers during the update (no θ copy; the hyper-optimizer
        # and the clamp write θ in place, the same operations as on a copy)
        for leaf, t in zip(self.leaves, self.tensors):
            leaf.data = t.detach()
        try:
            if self.apply_hypergradient(self.leaves, h, self.hyper_opt):
                with torch.no_grad():
                    for mw, sl in zip(self.managed, self.slices):
                        for leaf in self.leaves[sl]:
                            leaf.clamp_(mw.surrogate.a_min, mw.surrogate.a_max)
            else:
                self.skipped += 1
        finally:
            self._release_leaves()
        self.h = [None] * len(self.tensors)
        self.pairs = 0

    def _accumulated(self) -> list[Tensor]:
        """The window's h, zeros where nothing was added."""
        return [torch.zeros_like(t) if x is None else x for x, t in zip(self.h, self.tensors)]

    def _release_leaves(self) -> None:
        for leaf in self.leaves:
            leaf.data = leaf.data.new_empty(0)

    def diagnostics(self) -> dict[str, Any]:
        """``skipped_windows``: windows whose hypergradient was not finite."""
        return {"skipped_windows": self.skipped}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["hyper_opt"] = self.hyper_opt.state_dict()
        # not ``hypergrad``: a diagnostic of the last window, not part of the trajectory
        sd["h"], sd["pairs"], sd["skipped"] = self._accumulated(), self.pairs, self.skipped
        if self.pending is not None:
            sd["pending"] = self.pending.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.hyper_opt.load_state_dict(sd["hyper_opt"])
        self.h = [t.clone() for t in sd["h"]]  # accumulated in place: never alias the caller's dict
        self.pairs, self.skipped = sd["pairs"], sd["skipped"]
        self.hypergrad = []  # the next window's end sets it (a checkpoint does not hold it)
        p = sd.get("pending")
        self.pending = None if p is None else PendingStep.from_state_dict(type(self.optimizer), p)
