"""Forward quantizers (docs/design.md §1) as autograd Functions whose backward applies a surrogate ψ.

Signed b-bit grid: Qn = 2^(b−1), Qp = 2^(b−1) − 1; forward v̂ = round(clip(v/s, −Qn, Qp))·s
(``torch.round``: half to even). The backward never relies on ``clamp``'s own gradient:
∂L/∂v = ∂L/∂v̂ · ψ(v/s), and for a learnable step (LSQ)
∂v̂/∂s = round(u) − u inside [−Qn, Qp], −Qn below, Qp above, times g = 1/sqrt(N·Qp).

``deferred``: a quantizer whose ``defer_surrogate`` flag is set returns ∂L/∂v = ∂L/∂v̂ (ψ ≡ 1)
so that an optimizer wrapper can apply ψ after backward, on the complete (accumulated,
all-reduced) gradient — the HyperSTE design (docs/design.md §3.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._functions import _RoundQuantFn, _SignQuantFn
from .surrogates import Surrogate

__all__ = [
    "Quantizer",
    "FixedScaleQuantizer",
    "LSQQuantizer",
    "DoReFaBinaryQuantizer",
    "QUANTIZERS",
    "signed_grid",
    "check_bits",
    "check_weight_dtype",
    "S_EPS",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
S_EPS = 1e-8  # lower clamp of a learnable step size


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= 16:
        raise ValueError(f"Invalid bits: {bits}; metaste supports 1 <= bits <= 16")
    return bits


def signed_grid(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of the signed grid; binary uses Qn = Qp = 1 (docs/design.md §0, §2 decision)."""
    check_bits(bits)
    if bits == 1:
        return 1, 1
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def check_weight_dtype(w: Tensor, what: str = "weight") -> None:
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {w.dtype}; metaste quantizes float32/float64 latent weights only "
            f"(integer and reduced-precision latents such as bfloat16 swallow the small updates "
            f"QAT relies on). Convert with .float() first."
        )


def _channel_view(x: Tensor, ndim: int) -> Tensor:
    return x.view((-1,) + (1,) * (ndim - 1))


GRID_KEY = "grid"  # state_dict entry (uint8 bytes of the spec string) that defines the grid


def _encode_spec(spec: str) -> Tensor:
    return torch.tensor(list(spec.encode()), dtype=torch.uint8)


def _decode_spec(t: Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode(errors="replace")


class GridSpecMixin:
    """Saves what defines the grid (``grid_spec()``: quantizer kind, bits, surrogate, ...) in the
    ``state_dict`` as ``<prefix>grid`` (a uint8 tensor of the spec's bytes), and refuses to load
    a state saved with another grid: a 2-bit checkpoint in a 3-bit model, PLSTE into SLSTE or
    LSQ into a fixed quantizer raises ``ValueError`` before this module's tensors are copied. A
    state without the entry (a float model's, an older checkpoint) loads unchecked."""

    def grid_spec(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def grid(self) -> Tensor:
        """The ``grid`` entry of the state_dict as an attribute: every state_dict key names an
        attribute, which ``torch.distributed.checkpoint`` relies on to map keys to modules."""
        return _encode_spec(self.grid_spec())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        destination[prefix + GRID_KEY] = _encode_spec(self.grid_spec())

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: list,
        unexpected: list,
        errors: list,
    ) -> None:
        check_grid(self, state_dict, prefix)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
        if prefix + GRID_KEY in unexpected:
            unexpected.remove(prefix + GRID_KEY)


def check_grid(module: GridSpecMixin, state_dict: dict, prefix: str) -> None:
    """Raise ``ValueError`` if ``state_dict[prefix + "grid"]`` names another grid than ``module``'s."""
    saved = state_dict.get(prefix + GRID_KEY)
    if saved is None:
        return
    saved_spec, own = _decode_spec(saved), module.grid_spec()
    if saved_spec != own:
        where = prefix.rstrip(".") or type(module).__name__
        raise ValueError(
            f"the state_dict's {where!r} was saved with the grid {saved_spec!r}; this model's is {own!r}. "
            "A checkpoint loads only into a model quantized with the same settings: quantize the float "
            "model with the checkpoint's bits / quantizer / surrogate, then load it"
        )


class Quantizer(GridSpecMixin, nn.Module):
    """Base class of weight quantizers.

    Every weight quantizer exposes what optimizer wrappers need from the parameter alone:
    ``qn``, ``qp``, ``surrogate`` (a :class:`~metaste.quant.surrogates.Surrogate`),
    ``scale(weight)`` (the current step s, broadcastable to the weight) and
    ``u(weight)`` = weight / scale, the surrogate's argument.
    """

    qn: int
    qp: int
    bits: int

    kind: str = ""  # "fixed" | "lsq" | "dorefa"

    #: the layer input's second moment per weight column (JacQuant's fit weights, docs/design.md
    #: §8): while ``input_moment_ema`` is set, every training forward adds its moment to
    #: ``input_moment_pending`` (sum, count), and :meth:`fold_input_moment` — once per optimizer
    #: step — folds their mean into the EMA ``input_moment``, so k micro-batches move it as one
    #: batch does. ``None``: off, the forward does nothing extra (every other use).
    input_moment_ema: float | None = None
    input_moment: Tensor | None = None
    input_moment_pending: tuple[Tensor, int] | None = None

    def fold_input_moment(self) -> None:
        """Fold the mean of the moments recorded since the last fold into ``input_moment``:
        m ← mean the first time, else m ← m + (1 − ema)·(mean − m)."""
        pending, self.input_moment_pending = self.input_moment_pending, None
        if pending is None or self.input_moment_ema is None:
            return
        total, count = pending
        mean = total if count == 1 else total / count
        if self.input_moment is None or self.input_moment.shape != mean.shape:
            self.input_moment = mean
        else:
            self.input_moment.lerp_(mean, 1.0 - self.input_moment_ema)

    def __init__(self, surrogate: Surrogate) -> None:
        super().__init__()
        self.surrogate = surrogate
        self.defer_surrogate = False

    def grid_spec(self) -> str:
        """What defines the grid and its training, saved in the state_dict (:class:`GridSpecMixin`)."""
        spec = f"{self.kind}:bits={self.bits}:surrogate={self.surrogate.name}"
        if hasattr(self, "per_channel"):
            spec += f":per_channel={int(self.per_channel)}"
        if hasattr(self, "binary_surrogate_scale"):
            spec += f":scale={self.binary_surrogate_scale}"
        return spec

    @property
    def ste_kind(self) -> str:
        """FOGZO smoothing kind of this quantizer's STE (docs/design.md §4.2)."""
        return self.surrogate.ste_kind

    def _set_grid(self, weight: Tensor, bits: int, per_channel: bool) -> None:
        """The signed multi-bit grid of the round-based quantizers (fixed-scale, LSQ)."""
        self.bits = check_bits(bits)
        if bits == 1:
            raise ValueError("bits=1 needs a sign quantizer: use quantizer='dorefa'")
        self.qn, self.qp = signed_grid(bits)
        _check_per_channel(weight, per_channel)
        self.per_channel = per_channel

    def scale(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def u(self, weight: Tensor) -> Tensor:
        return weight / self.scale(weight)

    def at_bits(self, weight: Tensor, bits: int) -> Tensor:
        """The weight fake-quantized on a finer grid of ``bits`` > ``self.bits`` over the same
        range (a bit-width curriculum, docs/design.md §12): s_b = s/2^(b − bits),
        v̂ = clamp(round(v/s_b), −Qn_b, Qp_b)·s_b, the same surrogate on the b-bit grid; LSQ's s
        trains through s_b with its own gradient scale."""
        raise ValueError(
            f"a {type(self).__name__} has no finer grid: the bit-width curriculum needs a round-based "
            "quantizer (quantizer='fixed' or 'lsq')"
        )

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes in [−Qn, Qp] (binary: ±1), as an integer tensor."""
        c = torch.clamp(torch.round(weight / self.scale(weight)), -self.qn, self.qp)
        return c.to(torch.int8 if self.bits <= 8 else torch.int32)


class FixedScaleQuantizer(Quantizer):
    """Uniform signed quantizer with a fixed (untrained) step ``s`` (buffer).

    ``init``: ``"max"`` (s = max|v|/Qp), ``"lsq"`` (s = 2·mean|v|/sqrt(Qp)) or a float.
    """

    kind = "fixed"

    def __init__(
        self,
        weight: Tensor,
        bits: int,
        surrogate: Surrogate,
        per_channel: bool = False,
        init: str | float = "max",
    ) -> None:
        super().__init__(surrogate)
        self._set_grid(weight, bits, per_channel)
        if isinstance(init, (int, float)) and not isinstance(init, bool):
            if not (math.isfinite(init) and init > 0):
                raise ValueError(f"Invalid init step: {init}; a float init must be finite and > 0")
            s = torch.full(_scale_shape(weight, per_channel), float(init), dtype=weight.dtype)
        elif init == "max":
            s = _reduce(weight.detach().abs(), per_channel, "amax") / self.qp
        elif init == "lsq":
            s = lsq_init(weight, self.qp, per_channel)
        else:
            raise ValueError(f"Invalid init: {init!r}; choose 'max', 'lsq' or a float")
        self.register_buffer("s", torch.clamp(s, min=S_EPS).to(weight.device))

    def scale(self, weight: Tensor) -> Tensor:
        return self.s

    def forward(self, weight: Tensor) -> Tensor:
        return _RoundQuantFn.apply(weight, self.s, self.qn, self.qp, self, 1.0)

    def at_bits(self, weight: Tensor, bits: int) -> Tensor:
        qn, qp = signed_grid(bits)
        return _RoundQuantFn.apply(weight, self.s / 2.0 ** (bits - self.bits), qn, qp, self, 1.0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class LSQQuantizer(Quantizer):
    """LSQ (Esser et al. 2020): learnable step ``s`` (a Parameter, trained by the base optimizer),
    init s0 = 2·mean|v|/sqrt(Qp) (per output channel if ``per_channel``), gradient scale
    g = 1/sqrt(N·Qp) with N the elements sharing that s; s is clamped to ≥ 1e−8 in forward."""

    kind = "lsq"

    def __init__(self, weight: Tensor, bits: int, surrogate: Surrogate, per_channel: bool = False) -> None:
        super().__init__(surrogate)
        self._set_grid(weight, bits, per_channel)
        self.s = nn.Parameter(torch.clamp(lsq_init(weight, self.qp, per_channel), min=S_EPS))
        n = weight[0].numel() if per_channel else weight.numel()
        self.grad_scale = 1.0 / math.sqrt(n * self.qp)

    def scale(self, weight: Tensor) -> Tensor:
        return self.s.detach().clamp(min=S_EPS)

    def forward(self, weight: Tensor) -> Tensor:
        s = self.s.clamp(min=S_EPS)
        return _RoundQuantFn.apply(weight, s, self.qn, self.qp, self, self.grad_scale)

    def at_bits(self, weight: Tensor, bits: int) -> Tensor:
        qn, qp = signed_grid(bits)
        s = self.s.clamp(min=S_EPS) / 2.0 ** (bits - self.bits)
        return _RoundQuantFn.apply(weight, s, qn, qp, self, self.grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class DoReFaBinaryQuantizer(Quantizer):
    """DoReFa 1-bit weights: v̂ = sign(v)·E, E = mean|v| (detached), sign(0) = +1.

    ``binary_surrogate_scale``: the surrogate sees u = v/E (``"E"``, default) or u = v
    (``"one"``). With ``"E"`` the clipped STE zeroes ≈ 42 % of Gaussian weights (docs/design.md §1).
    """

    kind = "dorefa"
    bits = 1
    qn = qp = 1

    def __init__(self, surrogate: Surrogate, binary_surrogate_scale: str = "E") -> None:
        super().__init__(surrogate)
        if binary_surrogate_scale not in ("E", "one"):
            raise ValueError(
                f"Invalid binary_surrogate_scale: {binary_surrogate_scale!r}; choose 'E' or 'one'"
            )
        self.binary_surrogate_scale = binary_surrogate_scale

    def magnitude(self, weight: Tensor) -> Tensor:
        """E = mean|v| (detached)."""
        return weight.detach().abs().mean()

    def scale(self, weight: Tensor) -> Tensor:
        if self.binary_surrogate_scale == "E":
            return self.magnitude(weight).clamp(min=S_EPS)
        return torch.ones((), dtype=weight.dtype, device=weight.device)

    def forward(self, weight: Tensor) -> Tensor:
        return _SignQuantFn.apply(weight, self.magnitude(weight), self.scale(weight), self)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        return torch.where(weight >= 0, 1, -1).to(torch.int8)

    def extra_repr(self) -> str:
        return f"bits=1, binary_surrogate_scale={self.binary_surrogate_scale!r}"


QUANTIZERS = ("fixed", "lsq", "dorefa")


def lsq_init(weight: Tensor, qp: int, per_channel: bool) -> Tensor:
    """LSQ's initial step s0 = 2·mean|v|/sqrt(Qp), per output channel if ``per_channel``."""
    return 2 * _reduce(weight.detach().abs(), per_channel, "mean") / math.sqrt(qp)


def _check_per_channel(weight: Tensor, per_channel: bool) -> None:
    if per_channel and weight.dim() < 2:
        raise ValueError(
            f"per_channel=True needs a weight with >= 2 dims (one scale per output channel), "
            f"got shape {tuple(weight.shape)}; use per_channel=False"
        )


def _scale_shape(weight: Tensor, per_channel: bool) -> tuple[int, ...]:
    return (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else ()


def _reduce(x: Tensor, per_channel: bool, how: str) -> Tensor:
    if not per_channel:
        return getattr(x, how)()
    flat = x.reshape(x.shape[0], -1)
    r = flat.amax(dim=1) if how == "amax" else flat.mean(dim=1)
    return _channel_view(r, x.dim())
