"""FOGZO's counter-based noise and its fused passes (docs/design.md §4.2, §4.5).

The noise z of (seed, t, i, k) is a pure function of a 64-bit key (``derive_seed(seed, t, i, k)``)
and the element index j — nothing is drawn in sequence and nothing has to be stored:

    h(x)  = x ^= x >>> 16; x *= 0x7FEB352D; x ^= x >>> 15; x *= 0x846CA68B; x ^= x >>> 16   (mod 2^32)
    bits  = h((j·0x9E3779B9 + key_lo) ^ key_hi)                                              (32 bits)
    W     = (bits >> 16 (as a signed int16) + ½) / 2^15        ∈ (−1, 1), the 2^16-level midpoint grid
    W'    = the same of the low 16 bits

(``h`` is C. Wellons's low-bias 32-bit integer hash, one round over a keyed Weyl sequence, as in
SplitMix.) z follows from W by the sampler of :data:`~metaste.optim.smoothing.SMOOTHINGS`; the
approxsign kind's two uniforms are W and W' of the same hash. Everything is written in torch
int32/float ops, so the same Python function is

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

import torch
from torch import Tensor

from .smoothing import SQRT3, SQRT6, TANH_EPS  # the laws' constants, defined once

__all__ = [
    "host_floats",
    "key_halves",
    "bits_from_index",
    "z_from_index",
    "perturb_",
    "combine_",
    "restore_combine_",
    "perturb_many_",
    "combine_many_",
    "restore_combine_many_",
]


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


def bits_from_index(j: Tensor, k1: Tensor | int, k2: Tensor | int) -> Tensor:
    """The 32 hashed bits (int32) of the int32 indices ``j`` for the key halves (k1, k2)."""
    return _h32_(torch.mul(j, _GAMMA).add_(k1).bitwise_xor_(k2))


def _w(half: Tensor) -> Tensor:
    """W = (k + ½)/2^15 ∈ (−1, 1) (float32) of signed 16-bit values k held in int32."""
    return half.to(torch.float32).add_(0.5).mul_(2.0**-15)


def z_from_index(kind: str, j: Tensor, k1: Tensor | int, k2: Tensor | int) -> Tensor:
    """z ∼ p̄ of ``kind`` (float32) at the int32 indices ``j``."""
    bits = bits_from_index(j, k1, k2)
    w = _w(bits >> 16)
    if kind in ("identity", "hardtanh"):
        return w.mul_(SQRT3)
    if kind == "approxsign":
        return w.add_(_w((bits & 0xFFFF).bitwise_xor_(0x8000).sub_(0x8000))).mul_(SQRT6 / 2)
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
    kind: str, offset: Tensor | int = 0,
) -> None:  # fmt: skip
    """v += α·ε⊙d_i in one pass, z computed from the element index (α ∈ {±1, ±2}: exact).

    A shard (FSDP2) passes ``offset``, its flat offset in the full tensor: z is then the full
    tensor's noise at the global indices offset + j."""
    z = z_from_index(kind, _index(v, offset), k1, k2)
    if v.dtype != torch.float32:
        z = z.to(v.dtype)
    v.add_(delta(z, g, eps2, beps, a_sig) * alpha)


def combine_(
    G: Tensor, eps: Tensor, scale_g: Tensor, zero: bool, vals: Tensor, k1s: Tensor, k2s: Tensor, kind: str,
    offset: Tensor | int = 0,
) -> None:  # fmt: skip
    """G ← g·s_g (0 if ``zero``) + Σ_i (vals_i·z_i) ⊘ ε in one pass (the order of ``addcdiv``);
    ``offset``: a shard's, as in :func:`perturb_`."""
    if zero:
        G.zero_()
    else:
        G.mul_(scale_g)
    j = _index(G, offset)
    for i in range(vals.numel()):
        z = z_from_index(kind, j, k1s[i], k2s[i])
        if G.dtype != torch.float32:
            z = z.to(G.dtype)
        G.add_((vals[i] * z) / eps)


def restore_combine_(
    v: Tensor, g: Tensor | None, eps2: Tensor, beps: Tensor, a_sig: Tensor, alpha: Tensor, k1: Tensor, k2: Tensor,
    G: Tensor, eps: Tensor, scale_g: Tensor, zero: bool, vals: Tensor, k1s: Tensor, k2s: Tensor, kind: str,
    offset: Tensor | int = 0,
) -> None:  # fmt: skip
    """:func:`perturb_` (v += α·ε⊙d with the noise of (k1, k2), read with the g before G replaces it)
    and then :func:`combine_` into ``G`` — G may be g itself — in one pass: the in-place restore of
    the last sample shares its noise with the combine (``(k1, k2)`` is one of ``(k1s, k2s)``; its z
    is computed once). The same values as the two passes run one after the other."""
    j = _index(v, offset)
    z = z_from_index(kind, j, k1, k2)
    if v.dtype != torch.float32:
        z = z.to(v.dtype)
    v.add_(delta(z, g, eps2, beps, a_sig) * alpha)
    if zero:
        G.zero_()
    else:
        G.mul_(scale_g)
    last = vals.numel() - 1
    for i in range(vals.numel()):
        zi = z if i == last else z_from_index(kind, j, k1s[i], k2s[i])
        if i != last and G.dtype != torch.float32:
            zi = zi.to(G.dtype)
        G.add_((vals[i] * zi) / eps)


# One call for all of a step's tensors: a compiled call costs ~50–100 µs in Dynamo's
# wrapper (guards, cache lookup) whatever its size, so a model of many small weights (a language
# model's projections) paid it per tensor per pass. Each loops over the per-tensor pass; under
# ``torch.compile`` the loop unrolls into one graph. ``k1s``/``k2s``: int32 keys per tensor
# (``[K]`` for a perturbation, ``[K, n]`` for a combine); ``offsets``: per tensor, 0 for a whole tensor.


def perturb_many_(
    vs: list[Tensor], gs: list[Tensor | None], eps2s: list[Tensor], bepss: list[Tensor], a_sigs: list[Tensor],
    alphas: list[Tensor], k1s: Tensor, k2s: Tensor, kind: str, offsets: list,
) -> None:  # fmt: skip
    """:func:`perturb_` on each tensor ``vs[k]`` with its own arguments."""
    for k in range(len(vs)):
        perturb_(
            vs[k],
            gs[k],
            eps2s[k],
            bepss[k],
            a_sigs[k],
            alphas[k],
            k1s[k],
            k2s[k],
            kind,
            offsets[k],
        )


def combine_many_(
    Gs: list[Tensor], epss: list[Tensor], scale_gs: list[Tensor], zero: bool, vals: list[Tensor], k1s: Tensor,
    k2s: Tensor, kind: str, offsets: list,
) -> None:  # fmt: skip
    """:func:`combine_` on each tensor ``Gs[k]`` with its own arguments."""
    for k in range(len(Gs)):
        combine_(Gs[k], epss[k], scale_gs[k], zero, vals[k], k1s[k], k2s[k], kind, offsets[k])


def restore_combine_many_(
    vs: list[Tensor], gs: list[Tensor | None], eps2s: list[Tensor], bepss: list[Tensor], a_sigs: list[Tensor],
    alphas: list[Tensor], k1: Tensor, k2: Tensor, Gs: list[Tensor], epss: list[Tensor], scale_gs: list[Tensor],
    zero: bool, vals: list[Tensor], k1s: Tensor, k2s: Tensor, kind: str, offsets: list,
) -> None:  # fmt: skip
    """:func:`restore_combine_` on each tensor (``k1``/``k2``: the restored sample's keys, ``[K]``)."""
    for k in range(len(vs)):
        restore_combine_(
            vs[k], gs[k], eps2s[k], bepss[k], a_sigs[k], alphas[k], k1[k], k2[k], Gs[k], epss[k], scale_gs[k],
            zero, vals[k], k1s[k], k2s[k], kind, offsets[k],
        )  # fmt: skip


def host_floats(xs: list[Tensor]) -> list[float]:
    """0-dim tensors as Python floats in one host transfer (exact: float64 holds every float32)."""
    dev = xs[0].device
    return torch.stack([x.to(device=dev, dtype=torch.float64) for x in xs]).tolist()
