"""The closure contract of the wrappers (docs/design.md §5): what a closure may return, and
the checks that refuse everything else with an error that says what to write instead.

A closure returns the loss (a scalar tensor) or a generator of micro-batch losses (gradient
accumulation). It may run ``backward()`` itself, as the closures ``torch.optim.LBFGS`` and
Lightning's automatic optimisation pass do, when the wrapper needs only one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "Closure",
    "NonFiniteLossError",
    "check_closure",
    "check_loss",
    "closure_value",
    "grad_scaler_factor",
    "losses",
    "summed_loss",
]

#: returns the loss, or a generator of micro-batch losses (gradient accumulation, docs/design.md §5)
Closure = Callable[[], Tensor | Iterator[Tensor]]


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or ±inf; no weight was changed."""


def losses(out: object, who: str) -> Iterator[Tensor]:
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
    items = list(losses(out, who))
    return items[0] if len(items) == 1 else torch.stack([x.reshape(()) for x in items]).sum()


def closure_value(closure: Closure, who: str) -> float:
    """The closure's loss as a float (the sum over micro-batches); call it under ``no_grad``."""
    return math.fsum(float(loss) for loss in losses(closure(), who))


def check_closure(closure: Closure | None, who: str, why: str = "") -> None:
    """Refuse a missing closure (``why``: the reason this step needs one) or a non-callable."""
    if closure is None:
        raise ValueError(
            f"{who}.step() needs a closure{' ' + why if why else ''}: pass one that returns the loss "
            "without calling backward, loss = opt.step(lambda: loss_fn(model(x), y))"
        )
    if not callable(closure):
        raise TypeError(f"{who}.step(closure): closure must be callable, got {type(closure)}")


def check_loss(loss: object, who: str) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"the closure passed to {who}.step() must return the loss as a torch.Tensor (or a "
            f"generator of micro-batch losses), got {type(loss).__name__}"
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
