"""The base class of every metaste optimizer wrapper (docs/design.md §5): the step protocol
they all run, param_groups/state sharing and, from :mod:`.checkpoint`, state_dict nesting.

A wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups`` list and ``state`` dict are
the wrapped optimizer's own objects, so LR schedulers, ``zero_grad`` and ``add_param_group``
work on either. ``state`` holds only what the base optimizer puts there (per-parameter
tensors), so the usual "move the optimizer state to a device" loop keeps working; everything
the wrapper keeps (step counters, history, schedules, hyper-optimizer state) goes under
``state_dict()["metaste"]`` via :meth:`_wrapper_state_dict`: one ``state_dict()`` saves
everything.

The step is the base class's and final: the released check, the closure or the user's own
gradients, the guard that restores buffers and the wrapper's own state on any error, micro-batches,
the GradScaler and clipping. A wrapper implements :meth:`OptimizerWrapper._update`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, final

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...quant.registry import lookup, model_roots
from .amp import GradientOverflow, ScaledStep, install_grad_scaler_guard
from .checkpoint import WrapperCheckpoint
from .closure import Closure, NonFiniteLossError, check_closure, losses
from .modules import captured_modules, outermost
from .snapshot import BufferGuard

__all__ = ["OptimizerWrapper", "check_latent_dtype", "check_quantized_dtypes"]


class OptimizerWrapper(WrapperCheckpoint, ScaledStep, Optimizer):
    """Base class of metaste's optimizer wrappers: it owns :meth:`step`; a wrapper implements
    :meth:`_update` (and :meth:`_closure_reason` if some of its steps need extra forward passes)."""

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
        self._warned_no_grad = False
        # fp16 loss scaling and clipping inside step (docs/design.md §5.1, optim/core/amp.py)
        self.grad_scaler: Any = None
        self.max_grad_norm: float | None = None
        self.configure_amp(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        self.last_grad_norm: Tensor | None = None  # the pre-clip norm of the last clipped step
        self.last_step_skipped = False  # the scaler found inf/NaN gradients in the last step
        self._in_step = False
        self._unscaled = False
        self._step_modules: list | None = None  # the modules the current step's closure refers to
        self._guard_cache: tuple[Any, list[nn.Module] | None] | None = None  # _guard_modules' last answer
        self.released = False  # set by the method that hands the model back (_release_call)
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    # -- the step protocol (docs/design.md §5) ----------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides step(): the step protocol (validation, the guard, micro-batches, "
                "the GradScaler, clipping, the released check) belongs to OptimizerWrapper; implement "
                "_update(closure) instead"
            )

    @final
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One step of the method, under the protocol every wrapper shares (docs/design.md §5):

        * ``opt.step(closure)``: the closure returns the loss (or a generator of micro-batch
          losses) and the wrapper runs backward — or, for a method that needs one forward pass,
          the closure runs ``backward()`` itself, torch-style (LBFGS, Lightning);
        * ``opt.step()`` after your own ``loss.backward()``, torch.optim's contract, for a method
          that needs one forward pass; a method that needs more (FOGZO, the horizon methods)
          says so.

        Returns the closure's loss (detached; ``None`` without a closure). If it raises, the
        weights, the optimizer state and the buffers the step could change are as they were.
        """
        who = type(self).__name__
        if closure is None and self._is_state_initialisation():
            self.optimizer.step()
            return None
        if self.released:
            raise RuntimeError(
                f"this {who} was released ({self._release_call}() handed the model back); it cannot step "
                f"again. Build a new {who} over the optimizer to train with it"
            )
        why = self._closure_reason()
        if closure is None and why:
            check_closure(closure, who, why)
        if closure is not None and not callable(closure):
            check_closure(closure, who)
        self._before_step()
        return self._run_step(self._guarded_update, closure)

    def _is_state_initialisation(self) -> bool:
        """Whether this ``step()`` is the one ``torch.distributed.checkpoint`` runs to create the
        optimizer state: every lr 0 and every gradient zero. It changes no weight, so only the
        base optimizer steps (the wrapper's own state, its counters included, stays as it is)."""
        groups = self.param_groups
        if not groups or any(
            not isinstance(g.get("lr"), (int, float, Tensor)) or float(g["lr"]) != 0.0 for g in groups
        ):
            return False
        grads = [p.grad for p in self.params() if p.requires_grad]
        return bool(grads) and all(g is not None and not g.any() for g in grads)

    #: the method that hands the model back and ends the wrapper (``release``, ``remove``, ``close``)
    _release_call = "release"

    def _closure_reason(self) -> str:
        """Why the next step needs a closure (its extra forward passes), or ``""`` when it runs
        on the gradients of one forward and backward."""
        return ""

    def _before_step(self) -> None:
        """Checks that must pass before anything of the step runs (subclasses)."""

    def _update(self, closure: Closure | None) -> Tensor | None:
        """The method's update: get the gradients with :meth:`_evaluate`, change them, step the
        base optimizer; return the loss. Runs inside the guard and the GradScaler protocol."""
        raise NotImplementedError

    def _guarded_update(self, closure: Closure | None) -> Tensor | None:
        restore = self._extra_state()
        try:
            with self._step_guard(closure):
                return self._update(closure)
        except BaseException as error:
            if not isinstance(error, GradientOverflow):
                restore()
            raise

    def _extra_state(self) -> Callable[[], None]:
        """A snapshot of what the step changes outside the weights, the optimizer state and the
        modules' buffers (subclasses); the callable puts it back after an error."""
        return _nothing

    # -- closures ----------------------------------------------------------------------------

    def _zero_grads(self) -> None:
        for p in self.params():
            p.grad = None

    def _managed_params(self) -> list[Tensor]:
        """The weights the wrapper manages (subclasses); used by the no-gradient warning."""
        return []

    def _unguarded_buffers(self) -> list[Tensor]:
        """Buffers the step guard need not snapshot (subclasses): a step that raises leaves them
        unchanged by itself."""
        return []

    def _guard_modules(self, closure: Any) -> list[nn.Module] | None:
        """The modules whose buffers a step with ``closure`` may change: the models the
        optimizer's quantized weights were quantized in (recorded by ``quantize_model``) and the
        modules the closure refers to (found without hooks, :func:`captured_modules`). ``None``
        when they do not hold every trained parameter: the closure may run a module found by
        neither, and only the hook guard sees it."""
        params = [p for p in self.params() if p.requires_grad]
        found = model_roots(params) + captured_modules(closure)
        key = (tuple(id(m) for m in found), tuple(id(p) for p in params))
        if self._guard_cache is not None and self._guard_cache[0] == key:  # the usual case: as last step
            return self._guard_cache[1]
        tops = outermost(found)
        held = {id(p) for m in tops for p in m.parameters()}
        modules = tops if all(id(p) in held for p in params) else None
        self._guard_cache = (key, modules)
        return modules

    @contextmanager
    def _step_guard(self, closure: Any = None) -> Iterator[None]:
        """Around a whole ``step``: if it raises, the buffers (BN running statistics, activation
        quantizer state) of every module that ran are put back (docs/design.md §5); weights and
        optimizer state are untouched because the base optimizer steps last. The modules are
        known without hooks (:meth:`_guard_modules`; a global hook breaks ``torch.compile``,
        docs/design.md §10.5); the hook guard only when they are not. A step without a closure
        runs no forward and guards no buffer. A skipped fp16 step
        (:class:`~.amp.GradientOverflow`) is not an error: the clean pass's buffers stay, as in a
        hand-written loop. Buffers named by :meth:`_unguarded_buffers` are not snapshotted: their
        owner writes them only once nothing can raise any more (one weight copy less
        for HyperSTE's surrogate parameters)."""
        modules = [] if closure is None else self._guard_modules(closure)
        exclude = self._unguarded_buffers()
        guard = BufferGuard(modules, on_error_only=True, exclude=exclude)
        overflow = None
        self._step_modules = modules or []  # the step's own guards reuse the search
        with guard:
            try:
                yield
            except GradientOverflow as skipped:
                overflow = skipped
            finally:
                self._step_modules = None
        if overflow is not None:
            raise overflow

    def _grad_marks(self) -> dict[int, tuple[int, int]]:
        """Which gradient tensor each parameter holds, and its version: a backward changes one."""
        return {id(p): (id(p.grad), p.grad._version) for p in self.params() if p.grad is not None}

    def _evaluate(self, closure: Closure | None, *, backward: bool = True) -> Tensor | None:
        """The step's gradients, and the loss (detached).

        * No closure: the gradients of the user's own ``loss.backward()`` (checked: some exist
          and all are finite); returns ``None``.
        * A closure that returns the loss: zero the gradients, run it, check what it returns, run
          ``backward``. ``backward=False`` (FOGZO's n-SPSA clean pass, where nothing needs a
          gradient) runs it under ``no_grad`` and skips backward. Gradient accumulation: it may
          return a generator of micro-batch losses; each is checked and backpropagated as soon as
          it is produced (its graph is freed before the next micro-batch's forward), and the
          returned loss is their sum.
        * A closure that ran backward itself (torch-style), when the step needs no other pass:
          its gradients are used as they are, added to any the user accumulated before.

        Raises a clear error — before any weight changes — for a non-tensor or non-scalar
        return, a non-finite loss and a loss scaled by a ``GradScaler``; then the gradients are
        cleared. With ``grad_scaler`` the backward is on the scaled loss, the gradients are
        unscaled, and inf/NaN gradients raise :class:`~.amp.GradientOverflow` (the step is
        skipped, like ``GradScaler.step``); a non-finite loss is then left to that test, as in a
        hand-written loop.
        """
        who = type(self).__name__
        if closure is None:
            return self._own_gradients(who)
        check_closure(closure, who)
        scaler = self._active_scaler() if backward else None
        total: Tensor | None = None
        marks = self._grad_marks()
        ran_backward = False
        try:
            with torch.enable_grad() if backward else torch.no_grad():
                for k, loss in enumerate(losses(closure(), who)):
                    if k == 0:
                        ran_backward = any(marks.get(key) != mark for key, mark in self._grad_marks().items())
                        if ran_backward:
                            self._check_torch_closure(who, scaler is not None or not backward)
                        else:
                            self._zero_grads()
                    if scaler is None and not math.isfinite(loss.item()):
                        raise NonFiniteLossError(
                            f"the closure returned a non-finite loss ({loss.item()}"
                            + (f", micro-batch {k}" if k else "")
                            + "); no weight was changed. Lower the learning rate or check the data for NaN/inf"
                        )
                    if backward and not ran_backward:
                        if not loss.requires_grad:
                            raise ValueError(
                                "the loss returned by the closure does not require grad (was it computed "
                                "under torch.no_grad(), or are all parameters frozen?)"
                            )
                        (loss if scaler is None else scaler.scale(loss)).backward()
                    total = loss.detach() if total is None else total + loss.detach()
            if total is None:
                raise ValueError(f"the closure passed to {who}.step() returned an empty iterable of losses")
        except BaseException:
            self._zero_grads()
            raise
        if scaler is not None:
            self._unscale(scaler, total)
        if backward:
            self._warn_if_no_grad()
        return total

    def _check_torch_closure(self, who: str, scaled_or_no_backward: bool) -> None:
        """A closure that ran backward itself is fine when the step needs no other pass and no
        loss scaling: its gradients are the step's."""
        why = self._closure_reason()
        if why or scaled_or_no_backward:
            reason = (
                f"{who} calls it again {why}" if why else "with a grad_scaler the wrapper scales the loss"
            )
            raise RuntimeError(
                f"the closure passed to {who}.step() called backward() itself; {reason}, so it must only "
                "return the loss: opt.step(lambda: loss_fn(model(x), y)) — the wrapper runs backward (and "
                "the extra passes) for you"
            )

    def _own_gradients(self, who: str) -> None:
        """``step()`` without a closure: the gradients of the user's ``loss.backward()``."""
        grads = [p.grad for p in self.params() if p.grad is not None]
        if not grads:
            raise ValueError(
                f"{who}.step() without a closure uses the gradients of your own loss.backward(), but no "
                "parameter has one: call loss.backward() first, or pass a closure that returns the loss"
            )
        scaler = self._active_scaler()
        if scaler is not None:
            self._unscale(scaler, None)
        elif not bool(torch.stack([g.detach().abs().amax() for g in grads]).isfinite().all()):
            self._zero_grads()
            raise NonFiniteLossError(
                f"{who}.step(): the gradients hold NaN or inf (was the loss non-finite?); no weight was "
                "changed and the gradients were cleared. Lower the learning rate or check the data"
            )
        self._warn_if_no_grad()
        return None

    def _warn_if_no_grad(self) -> None:
        managed = self._managed_params()
        if managed and not self._warned_no_grad and all(p.grad is None for p in managed):
            self._warned_no_grad = True
            warnings.warn(
                f"{type(self).__name__}.step(): the loss did not reach any of the {len(managed)} managed "
                "weights (none got a gradient): is the closure computing the loss with the model this "
                "optimizer was built over? The step trains nothing of them (warning once)",
                RuntimeWarning,
                stacklevel=4,
            )


def check_quantized_dtypes(params: Iterator[Tensor] | list[Tensor], who: str) -> None:
    """:func:`check_latent_dtype` on every trainable quantized weight among ``params``: the
    wrappers call it first, before they change anything on the model."""

    for p in params:
        if p.requires_grad and lookup(p) is not None:
            check_latent_dtype(p, who, f"of shape {tuple(p.shape)}")


def check_latent_dtype(p: Tensor, who: str, name: str) -> None:
    """Managed latent weights must be float32/float64: bf16/fp16 latents swallow the small
    updates (FOGZO's perturbation ε⊙d, the surrogate's reshaping of the gradient)."""
    if p.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{who} manages the weight {name} (shape {tuple(p.shape)}) with dtype {p.dtype}; managed "
            "latent weights must be float32 (or float64): bf16/fp16 latents swallow the small updates "
            "QAT relies on (FOGZO's perturbation ε⊙d, HyperSTE's surrogate gradient). Keep the latent "
            "weights in float32 and autocast the forward"
        )


install_grad_scaler_guard(OptimizerWrapper)


def _nothing() -> None:
    pass
