"""What FOGZO and HyperSTE share (docs/design.md §5): param_groups/state sharing, closure checks,
state_dict nesting.

A wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups`` list and ``state`` dict are
the wrapped optimizer's own objects, so LR schedulers, ``zero_grad`` and ``add_param_group``
work on either. ``state`` holds only what the base optimizer puts there (per-parameter
tensors), so the usual "move the optimizer state to a device" loop keeps working; everything
the wrapper keeps (step counters, history, schedules, hyper-optimizer state) goes under
``state_dict()["metaste"]`` via :meth:`_wrapper_state_dict`: one ``state_dict()`` saves
everything.

Size: ~480 lines, because every wrapper's guarantees live here once — the step guard that
restores weights and buffers on any error, the checkpoint validation and roll-back, the
micro-batch closure protocol and the GradScaler hook; split, each piece would be re-imported by
all six wrappers.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._modules import ModuleBufferGuard, captured_modules
from ._snapshot import BufferGuard
from .amp import GradientOverflow, check_grad_scaler, found_inf

__all__ = [
    "OptimizerWrapper",
    "NonFiniteLossError",
    "Closure",
    "check_latent_dtype",
    "check_quantized_dtypes",
    "closure_value",
]

#: returns the loss, or a generator of micro-batch losses (gradient accumulation, docs/design.md §5)
Closure = Callable[[], Tensor | Iterator[Tensor]]


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
        self._warned_no_grad = False
        # fp16 loss scaling and clipping inside step (docs/design.md §5.1, optim/amp.py)
        self.grad_scaler: Any = None
        self.max_grad_norm: float | None = None
        self.configure_amp(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        self.last_grad_norm: Tensor | None = None  # the pre-clip norm of the last clipped step
        self.last_step_skipped = False  # the scaler found inf/NaN gradients in the last step
        self._in_step = False
        self._unscaled = False
        self._step_modules: list | None = None  # the modules the current step's closure refers to
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
        sd["metaste"] = {**self._wrapper_identity(), **self._settings(), **self._wrapper_state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of the same kind of wrapper. The whole dict is validated first
        (wrapper kind, base optimizer, the settings that define the trajectory — a mismatch with
        the constructor raises ``ValueError`` naming each one, :meth:`_check_wrapper_state_dict`);
        a load that fails changes nothing."""
        sd = dict(state_dict)
        wrapper_sd = sd.pop("metaste", None)
        if wrapper_sd is None:
            raise ValueError(
                f"state_dict has no 'metaste' entry: it was not saved by {type(self).__name__}; "
                "load a bare optimizer's state with wrapper.optimizer.load_state_dict(...)"
            )
        self._check_wrapper_state_dict(wrapper_sd)
        old_state, old_groups = self.optimizer.state, self.optimizer.param_groups
        try:
            old_wrapper: dict[str, Any] | None = self._wrapper_state_dict()
        except Exception:  # a method that has not stepped yet may not have all its state
            old_wrapper = None
        try:
            # torch builds new state and group objects: the old ones stay intact for a roll-back
            self.optimizer.load_state_dict(sd)
            self.state = self.optimizer.state  # rebound by load_state_dict: share it again
            self.param_groups = self.optimizer.param_groups
            self._load_wrapper_state_dict(wrapper_sd)
        except BaseException:
            self.optimizer.state, self.optimizer.param_groups = old_state, old_groups
            self.state, self.param_groups = old_state, old_groups
            if old_wrapper is not None:
                self._load_wrapper_state_dict(old_wrapper)
            raise

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {}

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        pass

    SETTINGS: tuple[str, ...] = ()  # the attributes that define the trajectory

    def _settings(self) -> dict[str, Any]:
        """The constructor settings a checkpoint must match (saved in ``state_dict()["metaste"]``)."""
        return {k: getattr(self, k) for k in self.SETTINGS}

    def _wrapper_identity(self) -> dict[str, Any]:
        """What ``state_dict()["metaste"]`` records about the wrapper kind and base optimizer."""
        return {"wrapper": type(self).__name__, "optimizer": type(self.optimizer).__name__}

    def _check_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (before anything is loaded) if ``state`` was saved by another kind
        of wrapper or over another base optimizer. Subclasses add their settings."""
        who = type(self).__name__
        if not isinstance(state, dict):
            raise ValueError(
                f"state_dict['metaste'] must be a dict saved by {who}, got {type(state).__name__}"
            )
        kind = state.get("wrapper") or (
            "HyperSTE" if "method_name" in state else "FOGZO" if "seed" in state else None
        )
        if kind != who:
            raise ValueError(
                f"this state_dict was saved by {kind or 'an unknown wrapper'}, not by {who}: a wrapper "
                f"loads only its own kind's state_dict; build a {kind or 'matching wrapper'} to resume it, "
                f"or load just the base optimizer's state with {who}.optimizer.load_state_dict(sd) "
                "after removing sd['metaste']"
            )
        base = state.get("optimizer")
        if base is not None and base != type(self.optimizer).__name__:
            raise ValueError(
                f"this state_dict was saved over torch.optim.{base}; this {who} wraps "
                f"{type(self.optimizer).__name__}"
            )
        self._check_settings(who, state, self._settings())

    @staticmethod
    def _check_settings(who: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming every setting whose saved value differs from the
        constructor's (the checkpoint's trajectory cannot be continued with other settings)."""
        diff = [
            f"{k}={saved[k]!r} (constructor: {now[k]!r})" for k in now if k in saved and saved[k] != now[k]
        ]
        if diff:
            raise ValueError(
                f"this state_dict was saved by a {who} with other settings: {', '.join(diff)}. The "
                f"constructor's settings are kept and must match the checkpoint's: build the {who} "
                "with the saved values to resume it (docs/design.md §5)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

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

    @contextmanager
    def _step_guard(self, closure: Any = None) -> Iterator[None]:
        """Around a whole ``step``: if it raises, the buffers (BN running statistics, activation
        quantizer state) of every module that ran are put back (docs/design.md §5); weights and
        optimizer state are untouched because the base optimizer steps last. The modules are those
        the closure refers to, found without hooks (a global hook breaks ``torch.compile``,
        docs/design.md §10.5); the hook guard only when none is found. A skipped fp16 step
        (:class:`~.amp.GradientOverflow`) is not an error: the clean pass's buffers stay, as in a
        hand-written loop. Buffers named by :meth:`_unguarded_buffers` are not snapshotted: their
        owner writes them only once nothing can raise any more (one weight copy less
        for HyperSTE's surrogate parameters)."""
        modules = captured_modules(closure) if closure is not None else []
        exclude = self._unguarded_buffers()
        guard = (
            ModuleBufferGuard(modules, on_error_only=True, exclude=exclude)
            if modules
            else BufferGuard(on_error_only=True, exclude=exclude)
        )
        overflow = None
        self._step_modules = modules  # the step's own guards reuse the search
        with guard:
            try:
                yield
            except GradientOverflow as skipped:
                overflow = skipped
            finally:
                self._step_modules = None
        if overflow is not None:
            raise overflow

    def _evaluate(self, closure: Closure | None, *, backward: bool = True) -> Tensor:
        """Zero the gradients, call ``closure``, check what it returns, run ``backward`` and return
        the detached loss. ``backward=False`` (FOGZO's n-SPSA clean pass, where nothing needs a
        gradient) runs the closure under ``no_grad`` and skips backward.

        Gradient accumulation: the closure may return an iterable (a generator) of micro-batch
        losses; each is checked and backpropagated as soon as it is produced (its graph is freed
        before the next micro-batch's forward), and the returned loss is their sum.

        Raises a clear error — before any weight changes — for a missing closure, a non-tensor
        or non-scalar return, a closure that ran backward itself, a non-finite loss and a loss
        scaled by a ``GradScaler``; then the gradients are cleared. With ``grad_scaler`` the
        backward is on the scaled loss, the gradients are unscaled, and inf/NaN gradients raise
        :class:`~.amp.GradientOverflow` (the step is skipped, like ``GradScaler.step``); a
        non-finite loss is then left to that test, as in a hand-written loop.
        """
        who = type(self).__name__
        check_closure(closure, who)
        self._zero_grads()
        scaler = self._active_scaler() if backward else None
        total: Tensor | None = None
        try:
            with torch.enable_grad() if backward else torch.no_grad():
                for k, loss in enumerate(_losses(closure(), who)):
                    if k == 0 and any(p.grad is not None for p in self.params()):
                        raise RuntimeError(
                            f"the closure passed to {who}.step() called backward() itself; "
                            "it must only return the loss: opt.step(lambda: loss_fn(model(x), y)) — "
                            "the wrapper runs backward (and the extra passes) for you"
                        )
                    if scaler is None and not math.isfinite(loss.item()):
                        raise NonFiniteLossError(
                            f"the closure returned a non-finite loss ({loss.item()}"
                            + (f", micro-batch {k}" if k else "")
                            + "); no weight was changed. Lower the learning rate or check the data for NaN/inf"
                        )
                    if backward:
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
            scaler.unscale_(self.optimizer)
            self._unscaled = True
            if found_inf(scaler, self.optimizer):
                raise GradientOverflow(total)
        if backward:
            self._warn_if_no_grad()
        return total

    # -- fp16 loss scaling and clipping (docs/design.md §5.1) ------------------------------

    #: whether ``step`` runs the scaler/clipping protocol (:meth:`_run_step`): FOGZO, HyperSTE
    _supports_amp = False

    def configure_amp(self, *, grad_scaler: Any = None, max_grad_norm: float | None = None) -> None:
        """Set the ``GradScaler`` and the clip value (the constructor's ``grad_scaler=`` and
        ``max_grad_norm=``; the trainer integrations call it with the framework's). ``None``
        turns either off. A wrapper whose step does not run the protocol refuses both."""
        who = type(self).__name__
        if (grad_scaler is not None or max_grad_norm is not None) and not self._supports_amp:
            raise ValueError(
                f"{who} does not take grad_scaler / max_grad_norm: only metaste.FOGZO and metaste.HyperSTE "
                "run the fp16 loss-scaling and clipping protocol (docs/design.md §5.1). Train it in bf16 or "
                "float32, without gradient clipping (HF Trainer: max_grad_norm=0)"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}; it must be > 0 (or None: no clipping)")
        self.grad_scaler = check_grad_scaler(grad_scaler, who)
        self.max_grad_norm = max_grad_norm

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

    def _grad_scaler_step(self, scaler: Any, *args: Any, **kwargs: Any) -> Any:
        """What ``scaler.step(wrapper, ...)`` does (:func:`_install_grad_scaler_guard`): raise."""
        raise RuntimeError(
            f"scaler.step({type(self).__name__}, ...) is not supported: the wrapper runs backward (and "
            "its extra passes) itself, so a GradScaler cannot unscale the gradients in between. Give "
            f"the scaler to the wrapper instead — {type(self).__name__}(base, ..., grad_scaler=scaler) — "
            "and call loss = opt.step(closure) with a closure that returns the unscaled loss; it scales, "
            "unscales, skips overflow steps and updates the scale (docs/design.md §5.1)"
        )


def _losses(out: object, who: str) -> Iterator[Tensor]:
    """The loss(es) a closure returned: one tensor, or the items of an iterator (a generator of
    micro-batch losses), each checked. A list or tuple is refused: ``(loss, aux)`` would
    otherwise be trained on as two micro-batches."""
    if isinstance(out, Tensor):
        check_loss(out, who)
        yield out
        return
    if isinstance(out, (list, tuple)):
        raise TypeError(
            f"the closure passed to {who}.step() returned a {type(out).__name__}; return the loss tensor "
            "alone (a closure that computes (loss, aux) must return loss), or, for gradient accumulation, "
            "yield the micro-batch losses from a generator: opt.step(lambda: (loss_fn(model(x), y) / n "
            "for x, y in micro))"
        )
    if isinstance(out, (str, bytes)) or not isinstance(out, Iterator):
        check_loss(out, who)  # raises: not a tensor
    for loss in out:  # type: ignore[union-attr]
        check_loss(loss, who)
        yield loss


def summed_loss(out: object, who: str) -> Tensor:
    """A closure's return value as one loss tensor (micro-batch losses summed, graphs kept):
    for the places that differentiate the loss as a whole (LGATT's reverse sweep)."""
    losses = list(_losses(out, who))
    return losses[0] if len(losses) == 1 else torch.stack([x.reshape(()) for x in losses]).sum()


def closure_value(closure: Closure, who: str) -> float:
    """The closure's loss as a float (the sum over micro-batches); call it under ``no_grad``."""
    return math.fsum(float(loss) for loss in _losses(closure(), who))


def check_quantized_dtypes(params: Iterator[Tensor] | list[Tensor], who: str) -> None:
    """:func:`check_latent_dtype` on every trainable quantized weight among ``params``: the
    wrappers call it first, before they change anything on the model."""
    from ..quant.registry import lookup

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
            f"the closure passed to {who}.step() must return the loss as a torch.Tensor (or an "
            f"iterable of micro-batch losses), got {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"the closure passed to {who}.step() must return a scalar loss, got shape "
            f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean())"
        )
    factor = grad_scaler_factor(loss)
    if factor is not None:
        raise ValueError(
            f"the closure passed to {who}.step() returned a loss multiplied by {factor:g}, which looks "
            "like GradScaler.scale(loss): the wrapper runs backward itself and never unscales, so the "
            f"step would be {factor:g}x too large. Return the unscaled loss and give the scaler to the "
            "wrapper: grad_scaler=scaler (docs/design.md §5.1)"
        )


def grad_scaler_factor(loss: Tensor) -> float | None:
    """The factor of ``loss`` if it is a GradScaler's output, else ``None``.

    What is detectable: ``scaler.scale(loss)`` is ``loss * scale`` with ``scale`` a 0-dim
    float32 tensor that does not require grad and holds a power of two (65536 at first; growth
    and back-off multiply by 2 and 0.5), so the returned loss's last operation is a
    multiplication that saved such a tensor. Flagged: a factor that is a power of two ≥ 2^8. Not
    detectable: anything applied after the scaling (``scaler.scale(loss) / k``, a sum of scaled
    micro-batch losses), a scale below 2^8, or a factor passed as a Python number.
    """
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    for attr in ("_saved_other", "_saved_self"):
        try:
            t = getattr(fn, attr)
        except (AttributeError, RuntimeError):
            continue
        if isinstance(t, Tensor) and t.dim() == 0 and t.dtype == torch.float32 and not t.requires_grad:
            v = float(t)
            if v >= 2.0**8 and math.isfinite(v) and math.frexp(v)[0] == 0.5:
                return v
    return None


def _install_grad_scaler_guard() -> None:
    """Make ``GradScaler.step(wrapper, ...)`` call ``wrapper._grad_scaler_step`` (a metaste error
    that says what to do) instead of failing inside torch on its ``_scale is None`` assertion,
    which GradScaler checks before it reaches the optimizer. Other optimizers are untouched."""
    cls = torch.amp.GradScaler
    if getattr(cls.step, "_metaste_guard", False):
        return
    original = cls.step

    @functools.wraps(original)
    def step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(optimizer, OptimizerWrapper):
            return optimizer._grad_scaler_step(self, *args, **kwargs)
        return original(self, optimizer, *args, **kwargs)

    step._metaste_guard = True  # type: ignore[attr-defined]
    cls.step = step  # type: ignore[method-assign]


_install_grad_scaler_guard()
