"""FOGZO's fused passes (docs/design.md §4.5): each regenerates the noise z of its samples from
the element index (:func:`metaste.optim.core.noise.z_from_index`) inside the pass that uses it,
eagerly or as one compiled kernel (the same ops in the same order, the same bits).

:func:`perturb_` is one pass v += α·(z⊙bε + aσ·g⊙ε²); :func:`combine_` is the final
G = g·s_g + Σ_i (b·c_i/n)·z_i ⊘ ε, one pass for all n samples; :func:`restore_combine_` undoes the
last perturbation in the same pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.noise import z_from_index

__all__ = [
    "delta",
    "perturb_",
    "combine_",
    "restore_combine_",
    "perturb_many_",
    "combine_many_",
    "restore_combine_many_",
]


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
