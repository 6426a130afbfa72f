"""Shared fixtures of the HyperSTE tests: small quantized models, data, and the smooth stand-in
quantizer of docs/design.md §3.5 (forward Ψ = s·clip(a·u, −Qn, Qp), so that ψ_SLSTE is its exact derivative)."""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.quant.layers import QuantLinear
from metaste.quant.quantizers import Quantizer
from metaste.quant.surrogate_factory import make_surrogate


def mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).to(
        dtype
    )


def quantized_mlp(seed: int = 0, surrogate: str = "slste", dtype=torch.float32, **kw) -> nn.Module:
    return metaste.quantize_model(mlp(seed, dtype), bits=2, surrogate=surrogate, **kw)


def batches(
    n: int, seed: int = 1, size: int = 32, dtype=torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 10, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def set_surrogate_params(model: nn.Module, lo: float, hi: float, seed: int = 3) -> None:
    """Random surrogate parameters in [lo, hi] (the default a = 1 makes many checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in metaste.surrogate_parameters(model):
            t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=t.dtype))


class _SmoothFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, s, a_fwd, qn, qp, quantizer):
        ctx.save_for_backward(v, s)
        ctx.qn, ctx.qp, ctx.quantizer = qn, qp, quantizer
        return s * torch.clamp(a_fwd * (v / s), -qn, qp)

    @staticmethod
    def backward(ctx, g):
        v, s = ctx.saved_tensors
        q = ctx.quantizer
        # ∂Ψ/∂v = a·1{−Qn ≤ a·u ≤ Qp} = ψ_SLSTE(u; a): the surrogate is the true derivative
        gv = g if q.defer_surrogate else g * q.surrogate.psi(v / s, ctx.qn, ctx.qp)
        return gv, None, None, None, None, None


class SmoothSLSTEQuantizer(Quantizer):
    """Ψ(v) = s·clip(a_fwd·v/s, −Qn, Qp). ``a_forward`` is fixed; the backward's a is the
    surrogate's (so a test can perturb θ in the backward only)."""

    def __init__(self, weight: torch.Tensor, s: float, qn: int = 2, qp: int = 1) -> None:
        super().__init__(make_surrogate("slste", tuple(weight.shape), dtype=weight.dtype))
        self.qn, self.qp, self.bits = qn, qp, 2
        self.register_buffer("s", torch.tensor(s, dtype=weight.dtype))
        self.a_forward = torch.ones_like(weight)

    def scale(self, weight):
        return self.s

    def forward(self, weight):
        return _SmoothFn.apply(weight, self.s, self.a_forward, self.qn, self.qp, self)


def smooth_model(seed: int = 0) -> nn.Module:
    """float64 MLP whose first layer uses the smooth stand-in quantizer; a random θ."""
    torch.manual_seed(seed)
    first = nn.Linear(6, 8).double()
    q = SmoothSLSTEQuantizer(first.weight, s=0.25)
    layer = QuantLinear(6, 8, q, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(first.weight)
        layer.bias.copy_(first.bias)
        theta = 0.6 + torch.rand(q.surrogate.a.shape, dtype=torch.float64)
        q.surrogate.a.copy_(theta)
        q.a_forward = theta.clone()
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(8, 3).double())


def clone_run(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of (model, its optimizer with state)."""
    m2 = copy.deepcopy(model)
    sig = inspect.signature(type(opt).__init__).parameters
    opt2 = type(opt)(m2.parameters(), **{k: v for k, v in opt.defaults.items() if k in sig})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    return m2, opt2


# base optimizers of the finite-difference checks on the smooth stand-in model
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}

WARMUP = 4  # bare-optimizer steps before the checked steps (Adam's first step is sign-like)


def warmed_up_smooth_model(cls, kw: dict, data: list) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    """The smooth stand-in model (docs/design.md §3.5) after WARMUP bare steps of ``cls(**kw)`` on the
    first batches of ``data``; returns (model, optimizer, the remaining batches)."""
    model = smooth_model()
    opt = cls(model.parameters(), **kw)
    for x, y in data[:WARMUP]:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model, opt, data[WARMUP:]
