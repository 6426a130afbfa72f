"""FOGZO's counter-based noise and its fused passes (docs/design.md §4.2, §4.5; issue 11).

The noise z of (seed, t, i, k) is a pure function of a 64-bit key (``derive_seed(seed, t, i, k)``)
and the element index j — nothing is drawn in sequence and nothing has to be stored:

    h(x)  = x ^= x >>> 16; x *= 0x7FEB352D; x ^= x >>> 15; x *= 0x846CA68B; x ^= x >>> 16   (mod 2^32)
    bits  = h(h(j·0x9E3779B9 + key_lo) ^ key_hi)                                            (32 bits)
    W     = (bits >> 16 (as a signed int16) + ½) / 2^15        ∈ (−1, 1), the 2^16-level midpoint grid

(``h`` is C. Wellons's low-bias 32-bit integer hash; two rounds keyed by both halves of the key
make every (key, ·) a different bijection of the index.) z follows from W by the sampler of
:data:`~metaste.optim.smoothing.SMOOTHINGS` (approxsign: W at j and at j + m, m the tensor's
size). Everything is written in torch int32/float ops, so the same Python function is

* the **eager** path (any device, no compiler), and
* the body of a ``torch.compile`` kernel (inductor: one vectorised C++ loop on CPU, one Triton
  kernel on GPU) that computes z inside the pass that uses it.

Integer ops are exact and the float ops are the same ops in the same order (inductor contracts
no multiply-add on CPU: ``cpp.enable_floating_point_contract_flag`` is off), so both give the
same bits on the same device; the tests check it. The tanh kind (``atanh``, whose compiled and
library versions may differ in the last bit) always runs eagerly.

:func:`perturb_` is one pass v += α·(z⊙bε + aσ·g⊙ε²); :func:`combine_` is the final
G = g·s_g + Σ_i (b·c_i/n)·z_i ⊘ ε, one pass for all n samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "host_floats",
    "key_halves",
    "uniform_from_index",
    "z_from_index",
    "perturb_",
    "combine_",
    "restore_combine_",
    "kernel",
    "FUSE_MIN",
]

SQRT3 = math.sqrt(3.0)
SQRT6 = math.sqrt(6.0)
TANH_EPS = math.pi / math.sqrt(12.0)

#: ``fused="auto"`` compiles the passes when the step's managed weights hold at least this many
#: elements (below it, the compile time and the kernel launch outweigh the gain)
FUSE_MIN = 1 << 16


def _s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


_GAMMA, _M1, _M2 = _s32(0x9E3779B9), _s32(0x7FEB352D), _s32(0x846CA68B)


def key_halves(key: int) -> tuple[int, int]:
    """The two signed 32-bit halves of a 64-bit key."""
    return _s32(key), _s32(key >> 32)


def _h32_(x: Tensor) -> Tensor:
    """The hash, in place in ``x`` (a fresh int32 tensor): eager runs a third of the allocations."""
    # >>> (logical shift) = arithmetic shift, masked; int32 multiplication wraps modulo 2^32
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF)).mul_(_M1)
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF)).mul_(_M2)
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


def uniform_from_index(j: Tensor, k1: Tensor | int, k2: Tensor | int) -> Tensor:
    """W ∈ (−1, 1) (float32) of the int32 indices ``j`` for the key halves (k1, k2)."""
    bits = _h32_(_h32_(torch.mul(j, _GAMMA).add_(k1)).bitwise_xor_(k2))
    return (bits >> 16).to(torch.float32).add_(0.5).mul_(2.0**-15)


def z_from_index(kind: str, j: Tensor, m: int, k1: Tensor | int, k2: Tensor | int) -> Tensor:
    """z ∼ p̄ of ``kind`` (float32) at indices ``j`` of a tensor of ``m`` elements."""
    w = uniform_from_index(j, k1, k2)
    if kind in ("identity", "hardtanh"):
        return w.mul_(SQRT3)
    if kind == "approxsign":
        return w.add_(uniform_from_index(j + m, k1, k2)).mul_(SQRT6 / 2)
    if kind == "tanh":
        return w.atanh_().div_(TANH_EPS)
    raise ValueError(f"unknown STE kind {kind!r}")


def _index(v: Tensor, offset: Tensor | int = 0) -> Tensor:
    """The int32 element indices of ``v``: its flat index plus ``offset`` (a shard's global offset
    in the full tensor: a 0-dim int32 tensor, or 0)."""
    if v.numel() >= 1 << 31:
        raise ValueError(
            f"FOGZO's noise indexes elements with int32: a tensor of {v.numel()} elements is too large"
        )
    j = torch.arange(v.numel(), dtype=torch.int32, device=v.device).view(v.shape)
    return j if isinstance(offset, int) and offset == 0 else j.add_(offset)


def delta(z: Tensor, g: Tensor | None, eps2: Tensor, beps: Tensor, a_sig: Tensor) -> Tensor:
    """ε⊙d = z⊙(bε) + (aσ·g)⊙ε² (the order of ``torch.addcmul``); ``g=None``: the noise term."""
    w = z * beps
    return w if g is None else w + (a_sig * g) * eps2


def perturb_(
    v: Tensor, g: Tensor | None, eps2: Tensor, beps: Tensor, a_sig: Tensor, alpha: Tensor, k1: Tensor, k2: Tensor,
    kind: str, offset: Tensor | int = 0, numel: Tensor | int | None = None,
) -> None:  # fmt: skip
    """v += α·ε⊙d_i in one pass, z computed from the element index (α ∈ {±1, ±2}: exact).

    A shard (FSDP2) passes ``offset``, its flat offset in the full tensor, and ``numel``, the full
    tensor's size: z is then the full tensor's noise at the global indices offset + j."""
    z = z_from_index(kind, _index(v, offset), v.numel() if numel is None else numel, k1, k2)
    if v.dtype != torch.float32:
        z = z.to(v.dtype)
    v.add_(delta(z, g, eps2, beps, a_sig) * alpha)


def combine_(
    G: Tensor, eps: Tensor, scale_g: Tensor, zero: bool, vals: Tensor, k1s: Tensor, k2s: Tensor, kind: str,
    offset: Tensor | int = 0, numel: Tensor | int | None = None,
) -> None:  # fmt: skip
    """G ← g·s_g (0 if ``zero``) + Σ_i (vals_i·z_i) ⊘ ε in one pass (the order of ``addcdiv``);
    ``offset``/``numel``: a shard's, as in :func:`perturb_`."""
    if zero:
        G.zero_()
    else:
        G.mul_(scale_g)
    j = _index(G, offset)
    m = G.numel() if numel is None else numel
    for i in range(vals.numel()):
        z = z_from_index(kind, j, m, k1s[i], k2s[i])
        if G.dtype != torch.float32:
            z = z.to(G.dtype)
        G.add_((vals[i] * z) / eps)


def restore_combine_(
    v: Tensor, g: Tensor | None, eps2: Tensor, beps: Tensor, a_sig: Tensor, alpha: Tensor, k1: Tensor, k2: Tensor,
    G: Tensor, eps: Tensor, scale_g: Tensor, zero: bool, vals: Tensor, k1s: Tensor, k2s: Tensor, kind: str,
    offset: Tensor | int = 0, numel: Tensor | int | None = None,
) -> None:  # fmt: skip
    """:func:`perturb_` (v += α·ε⊙d with the noise of (k1, k2), read with the g before G replaces it)
    and then :func:`combine_` into ``G`` — G may be g itself — in one pass: the in-place restore of
    the last sample shares its noise with the combine (``(k1, k2)`` is one of ``(k1s, k2s)``; its z
    is computed once). The same values as the two passes run one after the other."""
    j = _index(v, offset)
    m = v.numel() if numel is None else numel
    z = z_from_index(kind, j, m, k1, k2)
    if v.dtype != torch.float32:
        z = z.to(v.dtype)
    v.add_(delta(z, g, eps2, beps, a_sig) * alpha)
    if zero:
        G.zero_()
    else:
        G.mul_(scale_g)
    last = vals.numel() - 1
    for i in range(vals.numel()):
        zi = z if i == last else z_from_index(kind, j, m, k1s[i], k2s[i])
        if i != last and G.dtype != torch.float32:
            zi = zi.to(G.dtype)
        G.add_((vals[i] * zi) / eps)


def host_floats(xs: list[Tensor]) -> list[float]:
    """0-dim tensors as Python floats in one host transfer (exact: float64 holds every float32)."""
    dev = xs[0].device
    return torch.stack([x.to(device=dev, dtype=torch.float64) for x in xs]).tolist()


#: the recompile limit while a kernel runs: each weight shape may compile its own variant
RECOMPILE_LIMIT = 64


_COMPILED: dict[str, Any] = {}
_BROKEN: list[str] = []  # a compile that failed once is not retried (the eager path gives the same bits)


def kernel(fn: Callable[..., None], kind: str, fused: bool) -> Callable[..., None]:
    """``fn`` compiled by ``torch.compile`` (dynamic shapes) when ``fused`` and the kind allows it,
    else ``fn`` itself. A kernel that fails to compile warns once and runs eagerly from then on."""
    if not fused or kind == "tanh" or _BROKEN:
        return fn
    name = fn.__name__
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    compiled = _COMPILED[name]

    def run(*args: Any) -> None:
        if _BROKEN:
            return fn(*args)
        try:
            # one variant per weight shape (Dynamo specialises these shapes): a model has more
            # shapes than the default limit of 8, past which a fullgraph kernel fails (issue 11).
            # Set and reset by hand: config.patch costs ~1 ms a call, a plain attribute µs.
            cfg = torch._dynamo.config
            limit = cfg.recompile_limit
            cfg.recompile_limit = max(RECOMPILE_LIMIT, limit)
            try:
                return compiled(*args)
            finally:
                cfg.recompile_limit = limit
        except Exception as err:  # no C++ compiler, no Triton, an unsupported device, ...
            _BROKEN.append(repr(err))
            warnings.warn(
                f"metaste could not compile its fused passes ({type(err).__name__}: {err}); running them "
                "eagerly, with the same numbers (FOGZO: pass fused=False to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )
            return fn(*args)

    return run
