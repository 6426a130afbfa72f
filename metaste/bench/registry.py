"""The registry of the methods ``metaste compare`` runs (docs/design.md §11).

A :class:`Method` says how to quantize the model (``quant``: overrides of the task's
``quantize_model`` settings, or ``None`` for the float reference) and how to build the
optimizer (``build``: from the model and a :class:`RunContext`). Every optimizer is driven the
same way by :func:`train_step`: wrappers through ``step(closure)``, plain optimizers through
zero_grad / backward / step. The methods themselves are registered by :mod:`.methods` (the STE
family), :mod:`.wrapper_methods`, :mod:`.peers` and :mod:`.curriculum_methods`; importing
:mod:`metaste.bench` registers them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from ..optim.core.wrapper import OptimizerWrapper

__all__ = [
    "Method",
    "RunContext",
    "METHODS",
    "STE_BASELINES",
    "register_method",
    "parse_method",
    "train_step",
    "base_optimizer",
]


@dataclass
class RunContext:
    """What a method may need to build its optimizer."""

    optimizer: str  # "sgd" | "adam" | "adamw": the task's base optimizer
    lr: float
    total_steps: int
    seed: int
    weight_decay: float = 0.0
    momentum: float = 0.0
    extra: dict = field(default_factory=dict)  # method options from the command line
    quant: dict = field(default_factory=dict)  # the quantize_model settings of the run (bits, quantizer, …)


def base_optimizer(
    model: nn.Module, ctx: RunContext, name: str | None = None, params: Iterable | None = None
) -> Optimizer:
    """The plain torch optimizer named ``name`` (default: the task's) over model.parameters()
    (or over ``params``: parameters or param groups)."""
    name = name or ctx.optimizer
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=ctx.lr, weight_decay=ctx.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=ctx.lr, weight_decay=ctx.weight_decay)
    raise ValueError(f"Unknown base optimizer {name!r}; choose 'sgd', 'adam' or 'adamw'")


@dataclass
class Method:
    name: str
    description: str
    quant: dict | None  # quantize_model overrides; None = float reference (no quantization)
    build: Callable[[nn.Module, RunContext], Optimizer]
    # forward-pass equivalents per step (an STE step = 3: forward + backward ≈ 2 forwards)
    fwd_equiv: Callable[[RunContext], float] = lambda ctx: 3.0
    options: tuple[str, ...] = ()  # the RunContext.extra keys ``build`` reads
    # True: the model trains in float for round(float_frac · total_steps) steps, then is quantized
    # (quantize_model, LSQ steps initialised from the trained weights) and ``build`` makes a fresh
    # optimizer for the rest of the run
    float_phase: bool = False
    # False: the runner leaves the model float and the method quantizes by its own means (a peer)
    substrate: bool = True
    # the weights to evaluate: inside this context the model holds its quantized weights
    eval_view: Callable[[nn.Module, Optimizer], AbstractContextManager] = lambda model, opt: (
        contextlib.nullcontext()
    )
    # raises ImportError naming the install command when an extra the method needs is missing
    available: Callable[[], object] = lambda: None
    # builds the run's QuantCurriculum over the quantized model (stepped after every optimizer step)
    curriculum: Callable[[nn.Module, RunContext], object] | None = None

    def float_steps(self, ctx: RunContext) -> int:
        """Steps of the float phase (0 without one)."""
        if not self.float_phase:
            return 0
        frac = float(ctx.extra.get("float_frac", FLOAT_FRAC_DEFAULT))
        return min(ctx.total_steps, max(0, int(round(frac * ctx.total_steps))))


METHODS: dict[str, Method] = {}

# the plain-STE family: ``--baseline best`` picks the best of these (variant × tuned lr × float phase)
STE_BASELINES = ("ste", "ste-identity", "ste-pwl", "ste-float", "ste-identity-float")
FLOAT_FRAC_DEFAULT = 0.1


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _parse_value(text: str) -> int | float | bool | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_method(spec: str) -> tuple[str, dict]:
    """``"fogzo[beta_min=0.999,n=2]"`` → ``("fogzo", {"beta_min": 0.999, "n": 2})``: a registered
    method with options fixed for this entry. Unknown names and options the method does not read
    raise ``ValueError`` naming the valid ones."""
    name, _, rest = spec.strip().partition("[")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices are {', '.join(METHODS)}")
    opts: dict = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"method {spec!r}: options go in brackets, e.g. fogzo[beta_min=0.999]")
        for item in filter(None, rest[:-1].split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method {spec!r}: expected key=value, got {item!r}")
            opts[key.strip()] = _parse_value(value.strip())
    check_options(name, opts)
    return name, opts


def check_options(name: str, opts: dict) -> None:
    """Raise ``ValueError`` if ``opts`` holds a key method ``name`` does not read."""
    valid = METHODS[name].options
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise ValueError(
            f"method {name!r} does not read option(s) {bad}; its options are "
            + (", ".join(valid) if valid else "none")
        )


def train_step(opt: Optimizer, closure: Callable[[], torch.Tensor]) -> float:
    """One optimizer step on ``closure`` (which returns the loss without backward)."""
    if isinstance(opt, OptimizerWrapper):
        return float(opt.step(closure))
    opt.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    opt.step()
    return float(loss.detach())
