"""The counter-based noise every zeroth-order pass draws (docs/design.md §4.2, §4.5): FOGZO's
perturbations, the calibrated surrogate's probes, and the seeds PEGE, JacQuant and the
curricula derive their own draws from.

The noise z of (seed, t, i, k) is a pure function of a 64-bit key (:func:`derive_seed` (seed, t,
i, k)) and the element index j — nothing is drawn in sequence and nothing has to be stored:

    h(x)  = x ^= x >>> 16; x *= 0x7FEB352D; x ^= x >>> 15; x *= 0x846CA68B; x ^= x >>> 16   (mod 2^32)
    bits  = h((j·0x9E3779B9 + key_lo) ^ key_hi)                                              (32 bits)
    W     = (bits >> 16 (as a signed int16) + ½) / 2^15        ∈ (−1, 1), the 2^16-level midpoint grid
    W'    = the same of the low 16 bits

(``h`` is C. Wellons's low-bias 32-bit integer hash, one round over a keyed Weyl sequence, as in
SplitMix.) z of each kind (p̄ of mean 0 and variance 1, the smoothing table of
:mod:`metaste.optim.fogzo.smoothing`) follows from W:

========== ====================================
kind       z, W = 2U − 1
========== ====================================
identity   √3·W                  (U(−√3, √3))
hardtanh   √3·W                  (U(−√3, √3))
tanh       atanh(W)/ε̄, ε̄ = π/√12
approxsign √6·(W + W')/2         (triangular)
========== ====================================

The 2^16-level grid is exactly symmetric and strictly inside (−1, 1), so ``atanh`` never sees ±1
(tanh kind: |z| ≤ 6.5, a tail of mass 2^-15 is cut and the variance is 0.999). Everything is
written in torch int32/float ops, so the same Python function is the **eager** path (any device,
no compiler) and the body of a ``torch.compile`` kernel (one vectorised C++ loop on CPU, one
Triton kernel on GPU) that computes z inside the pass that uses it. Integer ops are exact and the
float ops are the same ops in the same order (inductor contracts no multiply-add on CPU), so both
give the same bits on the same device; the tests check it. The tanh kind (``atanh``, whose
compiled and library versions may differ in the last bit) always runs eagerly. A shard of a
tensor (FSDP2) evaluates the same function at its global indices (:func:`noise_slice`), so the
union of the shards' noise is the single-process noise.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch
from torch import Tensor

from ..._compile import FUSE_MIN, compilable, kernel

__all__ = [
    "NOISE_KINDS",
    "SQRT3",
    "SQRT6",
    "TANH_EPS",
    "derive_seed",
    "rademacher",
    "key_halves",
    "bits_from_index",
    "z_from_index",
    "noise",
    "noise_slice",
]

#: the laws z can follow, one per STE kind
NOISE_KINDS = ("identity", "hardtanh", "tanh", "approxsign")
SQRT3 = math.sqrt(3.0)
SQRT6 = math.sqrt(6.0)
TANH_EPS = math.pi / math.sqrt(12.0)


def derive_seed(*key: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, t, i, k)): stable across runs and platforms."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rademacher(seed: int, step: int, sample: int) -> float:
    """σ_i ∈ {±1} for sample ``i`` of step ``t``."""
    return 1.0 if derive_seed(seed, step, sample, -1) & 1 else -1.0


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


def noise(kind: str, shape: torch.Size, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """z ∼ p̄ of ``kind``, i.i.d. per element, of ``shape``: a fresh tensor, regenerated
    bit-identically from ``seed`` on every call."""
    z = noise_slice(kind, 0, math.prod(shape), seed, device, dtype)
    return z.view(shape)


def noise_slice(
    kind: str, start: int, length: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Elements ``[start, start + length)`` of the flat noise z of ``seed``,
    ``noise(kind, (n,), seed, ...)[start : start + length]`` for any n ≥ start + length, generated
    without the rest: z is a pure function of (seed, element index), so the slice is the hash
    evaluated at the global indices start … start + length − 1. A shard of a tensor (FSDP2) thus
    draws exactly its part of the noise a single process draws. Returns a fresh flat tensor, made
    by one compiled pass from ``FUSE_MIN`` elements on (the bits of the eager ops)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown STE kind {kind!r}")
    if length <= 0:
        return torch.empty(0, device=device, dtype=dtype)
    if start + length > 1 << 31:
        raise ValueError(
            f"FOGZO's noise indexes elements with int32: elements up to {start + length} are too many"
        )
    j = torch.arange(start, start + length, dtype=torch.int32, device=device)
    fused = length >= FUSE_MIN and compilable(j)
    # the key as tensors: a new seed each step must not recompile the pass
    k1, k2 = (torch.tensor(k, dtype=torch.int32, device=device) if fused else k for k in key_halves(seed))
    z = kernel(z_from_index, kind, fused)(kind, j, k1, k2)
    return z if dtype == torch.float32 else z.to(dtype)
