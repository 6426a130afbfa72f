"""The FOGZO estimate as a plain function (docs/design.md §4.3): :func:`fogzo_estimate` reads
against the formula line by line, with its sharded (FSDP2) and fused paths, and the joint norm
N = ‖ε ⊙ g‖₂ over all managed tensors. The class that schedules β and keeps the RNG, buffers and
checkpoints is :class:`metaste.optim.fogzo.FOGZO`; the (ε̄, p̄, sampler) table of §4.2 is in
:mod:`metaste.optim.fogzo.smoothing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..._compile import FUSE_MIN, kernel
from ..core.noise import derive_seed, key_halves, noise_slice, rademacher
from .passes import combine_many_, delta, perturb_many_, restore_combine_many_

__all__ = ["RESTORE_MODES", "Shards", "fogzo_estimate", "joint_norm"]

#: how the weights are put back after the perturbed passes (``restore=`` of :func:`fogzo_estimate`)
RESTORE_MODES = ("copy", "inplace")


@dataclass(frozen=True)
class Shards:
    """Where each managed tensor's shard sits in its full tensor (FSDP2, docs/design.md §10.4):
    ``offsets[k]``/``numels[k]`` the shard's flat offset in and the size of the full tensor k (the
    noise of a shard is that slice of the full tensor's), ``reduce_sum`` the sum of a float over
    the ranks (of ‖ε⊙g‖² here)."""

    offsets: Sequence[int]
    numels: Sequence[int]
    reduce_sum: Callable[[float], float]


def fogzo_estimate(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    eps: Sequence[Tensor],
    kinds: Sequence[str],
    loss_at: Callable[[], float],
    *,
    beta: float,
    n: int,
    seed: int,
    step: int,
    one_sided: bool = False,
    loss0: float | None = None,
    restore: str = "copy",
    keep_noise: bool = False,
    reduce: Callable[[Tensor], Tensor] | None = None,
    fused: bool = False,
    shards: Shards | None = None,
) -> tuple[list[Tensor] | None, Tensor]:
    """The FOGZO estimate G of docs/design.md §4.3 for the managed tensors ``weights`` (v_k).

    ``grads[k]`` is the STE gradient g_k (``None``: zero), ``eps[k]`` = ε̄·s_k (broadcastable to
    v_k), ``kinds[k]`` its STE kind, ``loss_at()`` the loss at the current (perturbed) weights
    as a float. The weights are perturbed in place and restored (``restore="copy"``: bitwise;
    ``"inplace"``: +1, −2, +1, within 4 ulp of max|v| per cycle); ``loss_at`` is called 2n times (n if
    ``one_sided``, then c_i = L₊ − ``loss0``). ``reduce`` averages the c_i across processes.
    ``grads`` are overwritten with G. Returns (G per tensor, c), or (None, c) if some c_i is
    not finite (the caller keeps g). ``shards``: the weights are the rank's shards of sharded
    tensors (:class:`Shards`).

    The noise z_ik is regenerated from ``derive_seed(seed, step, i, k)`` each time it is used
    (``keep_noise=True`` keeps the n·D values instead: same result, fewer regenerations). Each
    perturbation is one pass that computes z from the element index
    (:func:`~metaste.optim.fogzo.passes.perturb_`), the final G one pass for all n samples
    (:func:`~metaste.optim.fogzo.passes.combine_`; ``"inplace"`` at n = 1: the same pass also
    restores the weights, :func:`~metaste.optim.fogzo.passes.restore_combine_`); ``fused=True``
    compiles them with ``torch.compile`` (the same numbers)::

        N  = ‖ε ⊙ g‖₂ over all tensors; ĝ = ε ⊙ g / N  (0 if N is 0 or not finite)
        for i in 1..n:
            d_i = √β σ_i ĝ + √(1−β) z_i
            c_i = [L(v + ε⊙d_i) − L(v − ε⊙d_i)] / 2
        G = (1/n) Σ_i c_i d_i ⊘ ε  =  g·√β Σ_i σ_i c_i / (nN)  +  Σ_i √(1−β) c_i/n · z_i ⊘ ε
    """
    d = _Directions(weights, grads, eps, kinds, beta, n, seed, step, keep_noise, fused, shards)
    originals = [v.clone() for v in weights] if restore == "copy" else None
    # in-place restore, n = 1: the restoring pass is also the combine pass (it computes the same
    # noise), so it waits for c. (n > 1 would save one of 4n draws and give the compiled kernel
    # one more variant per n: Dynamo's recompile limit, shared by all calls of a function, then
    # turns every fused pass eager.)
    fuse_last = originals is None and not d.keep and d.b != 0.0 and n == 1
    pending = list(range(len(weights)))  # the tensors not yet restored
    c = torch.empty(n, dtype=torch.float64)
    offset = (0, 0.0)  # (i, m): the weights ``pending`` are now v + m·ε⊙d_i
    try:
        # c_i from 2 (one-sided: 1) no-grad passes at v ± ε⊙d_i
        for i in range(n):
            d.shift(i, 1.0)
            offset = (i, 1.0)
            plus = loss_at()
            if one_sided:
                c[i] = plus - loss0
            else:
                if originals is not None:
                    for v, v0 in zip(weights, originals):
                        v.lerp_(v0, 2.0)  # v0 − (v⁺ − v0): the mirror image, no regeneration
                else:
                    d.shift(i, -2.0)
                offset = (i, -1.0)
                c[i] = (plus - loss_at()) / 2
            if originals is not None:
                for v, v0 in zip(weights, originals):
                    v.copy_(v0)
            elif fuse_last and i == n - 1:
                break  # restored with the combine below (or by ``finally``)
            else:
                d.shift(i, -offset[1])
            offset = (i, 0.0)
        originals = None  # every tensor is restored: the copies are freed
        if reduce is not None:
            c = reduce(c)
        if not bool(torch.isfinite(c).all()):
            return None, c
        return d.combine(c.tolist(), -offset[1] if fuse_last else 0.0, pending), c
    finally:
        if offset[1] != 0.0 and pending:  # a pass raised (or c is not finite): put the weights back
            if restore == "copy":
                for k in pending:
                    weights[k].copy_(originals[k])  # type: ignore[index]
            else:
                d.shift(offset[0], -offset[1], pending)


class _Directions:
    """The n directions of one estimate, ε⊙d_i = a σ_i (ε²⊙g) + b (ε⊙z_i) with a = √β/N and
    b = √(1−β), and the passes along them: :meth:`shift` moves the weights, :meth:`combine` forms G.

    The tensors are grouped by STE kind and device: one kernel call per group and pass, with the
    group's keys on its device. On a small eager step (at most ``FUSE_MIN`` noise values) the noise
    drawn is kept: the same numbers as regenerating them, one hash per sample instead of 2–4."""

    def __init__(
        self,
        weights: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        eps: Sequence[Tensor],
        kinds: Sequence[str],
        beta: float,
        n: int,
        seed: int,
        step: int,
        keep_noise: bool,
        fused: bool,
        shards: Shards | None,
    ) -> None:
        self.weights, self.grads, self.eps, self.kinds = weights, grads, eps, kinds
        self.n, self.seed, self.step, self.fused = n, seed, step, fused
        # ĝ = ε⊙g / N with N = ‖ε⊙g‖ over all managed tensors jointly
        norm = joint_norm(grads, eps, shards and shards.reduce_sum) if beta > 0 else 0.0
        inv_norm = 1.0 / norm if 0.0 < norm < math.inf else 0.0
        self.a, self.b = math.sqrt(beta) * inv_norm, math.sqrt(1.0 - beta)
        self.sigmas = [rademacher(seed, step, i) for i in range(n)]
        self.eps2 = [e * e for e in eps]
        self.beps = [e * self.b for e in eps]
        self.keep = keep_noise or (not fused and n * sum(v.numel() for v in weights) <= FUSE_MIN)
        self.kept: dict[tuple[int, int], Tensor] = {}
        self.scalars: dict[tuple[str, float, torch.dtype, torch.device], Tensor] = {}
        # a shard (FSDP2) draws the full tensor's noise at its global indices offset + j
        self.starts = [0] * len(weights) if shards is None else list(shards.offsets)
        totals = [v.numel() for v in weights] if shards is None else list(shards.numels)
        for v, s0, m in zip(weights, self.starts, totals):
            if not 0 <= s0 <= s0 + v.numel() <= m < 1 << 31:
                raise ValueError(
                    f"a shard of {v.numel()} elements at offset {s0} does not fit a tensor of {m} elements "
                    "(FOGZO's noise indexes elements with int32: at most 2^31 - 1)"
                )
        i32 = torch.int32
        # the kernels' index offsets per tensor (0-dim int32): 0 for whole tensors
        self.offs: list = (
            [0] * len(weights) if shards is None else [torch.tensor(s, dtype=i32) for s in self.starts]
        )
        keys = [[key_halves(derive_seed(seed, step, i, k)) for k in range(len(weights))] for i in range(n)]
        key1 = torch.tensor([[k1 for k1, _ in row] for row in keys], dtype=i32)  # [i, k]
        key2 = torch.tensor([[k2 for _, k2 in row] for row in keys], dtype=i32)
        self.groups: dict[tuple[str, torch.device], list[int]] = {}
        for k, (kind, v) in enumerate(zip(kinds, weights)):
            self.groups.setdefault((kind, v.device), []).append(k)
        every = list(range(len(weights)))  # the usual single group: no gather
        self.group_keys = {
            gk: (k1.to(gk[1]), k2.to(gk[1]))
            for gk, (k1, k2) in (
                (gk, (key1, key2) if sel == every else (key1[:, sel], key2[:, sel]))
                for gk, sel in self.groups.items()
            )
        }

    def scalar(self, x: float, like: Tensor, role: str = "") -> Tensor:
        """``x`` as a 0-dim tensor (one compiled kernel for all values), one per role, value, dtype
        and device: the lists a kernel gets alias the same way at every call (no recompiles)."""
        key = (role, x, like.dtype, like.device)
        if key not in self.scalars:
            self.scalars[key] = torch.tensor(x, dtype=like.dtype, device=like.device)
        return self.scalars[key]

    def z(self, i: int, k: int) -> Tensor:
        """The kept z_ik (a shard's: its slice of the full z), drawn on first use."""
        if (i, k) not in self.kept:
            v = self.weights[k]
            self.kept[(i, k)] = noise_slice(
                self.kinds[k],
                self.starts[k],
                v.numel(),
                derive_seed(self.seed, self.step, i, k),
                v.device,
                v.dtype,
            ).view(v.shape)
        return self.kept[(i, k)]

    def _move_args(self, i: int, alpha: float, sel: list[int]) -> tuple:
        """The arguments of a pass v += α·ε⊙d_i over the tensors ``sel``, before the keys."""
        w, a_sig = self.weights, self.a * self.sigmas[i]
        return (
            [w[k] for k in sel],
            [self.grads[k] if self.a != 0.0 else None for k in sel],
            [self.eps2[k] for k in sel],
            [self.beps[k] for k in sel],
            [self.scalar(a_sig, w[k], "a_sig") for k in sel],
            [self.scalar(alpha, w[k], "alpha") for k in sel],
        )

    def shift(self, i: int, alpha: float, ks: Sequence[int] | None = None) -> None:
        """v += alpha · ε⊙d_i, one pass per tensor (``ks``: only those tensors, eagerly: the same
        numbers, and no compiled variant for a subset that only an error asks for)."""
        every = range(len(self.weights)) if ks is None else ks
        if self.b == 0.0:  # β = 1: d_i = σ_i ĝ, no noise
            for k in every:
                if self.grads[k] is not None:
                    self.weights[k].add_(
                        self.grads[k] * (self.eps2[k] * (self.a * self.sigmas[i])), alpha=alpha
                    )
            return
        if self.keep:
            for k in every:
                v, gk = self.weights[k], self.grads[k] if self.a != 0.0 else None
                a_sig = self.scalar(self.a * self.sigmas[i], v, "a_sig")
                v.add_(
                    delta(self.z(i, k), gk, self.eps2[k], self.beps[k], a_sig)
                    * self.scalar(alpha, v, "alpha")
                )
            return
        for gk, group in self.groups.items():
            pos = [j for j, k in enumerate(group) if ks is None or k in ks]
            if pos:
                sel = [group[j] for j in pos]
                k1s, k2s = self.group_keys[gk]
                kernel(perturb_many_, gk[0], self.fused and ks is None)(
                    *self._move_args(i, alpha, sel),
                    k1s[i] if ks is None else k1s[i, pos],
                    k2s[i] if ks is None else k2s[i, pos],
                    gk[0],
                    [self.offs[k] for k in sel],
                )

    def combine(self, cs: list[float], restore_alpha: float, pending: list[int]) -> list[Tensor]:
        """G = g·√β Σσ_i c_i/(nN) + Σ_i √(1−β) c_i/n · z_i ⊘ ε, in the gradients' buffers.
        ``restore_alpha`` ≠ 0: the weights are still at v − restore_alpha·ε⊙d_{n−1}, and each
        group's pass moves them back too (removing its tensors from ``pending``)."""
        n, a, b = self.n, self.a, self.b
        scale_g = a * sum(s * ci for s, ci in zip(self.sigmas, cs)) / n
        Gs = [g if g is not None else torch.zeros_like(v) for g, v in zip(self.grads, self.weights)]
        zero = scale_g == 0.0  # ĝ = 0: drop g (even a non-finite one) exactly
        if b == 0.0 or self.keep:
            for k, G in enumerate(Gs):
                G.zero_() if zero else G.mul_(scale_g)
                if b != 0.0:
                    for i in range(n):
                        G.add_((self.scalar(b * cs[i] / n, G) * self.z(i, k)) / self.eps[k])
            return Gs
        vals = {}  # per dtype and device: b·c_i/n
        for G in Gs:
            if (G.dtype, G.device) not in vals:
                vals[(G.dtype, G.device)] = torch.tensor(
                    [b * ci / n for ci in cs], dtype=G.dtype, device=G.device
                )
        for gk, sel in self.groups.items():
            k1s, k2s = self.group_keys[gk]
            common = (
                [Gs[k] for k in sel],
                [self.eps[k] for k in sel],
                [self.scalar(scale_g, Gs[k], "scale_g") for k in sel],
                zero,
                [vals[(Gs[k].dtype, Gs[k].device)] for k in sel],
                k1s.T.contiguous(),
                k2s.T.contiguous(),
                gk[0],
                [self.offs[k] for k in sel],
            )
            if restore_alpha != 0.0:
                i = n - 1
                kernel(restore_combine_many_, gk[0], self.fused)(
                    *self._move_args(i, restore_alpha, sel), k1s[i], k2s[i], *common
                )
                pending[:] = [k for k in pending if k not in sel]
            else:
                kernel(combine_many_, gk[0], self.fused)(*common)
        return Gs


def joint_norm(
    grads: Sequence[Tensor | None], eps: Sequence[Tensor], reduce_sum: Callable[[float], float] | None = None
) -> float:
    """N = ‖ε ⊙ g‖₂ over all tensors, without a tensor-sized temporary for a scalar ε."""
    pairs = [(g, e) for g, e in zip(grads, eps) if g is not None]
    if not pairs:
        return 0.0
    # the per-tensor norms on the device, one host sync (then the same float arithmetic as before)
    norms = torch.stack(
        [torch.linalg.vector_norm(g) if e.numel() == 1 else torch.linalg.vector_norm(g * e) for g, e in pairs]
    ).tolist()
    scalars = (
        torch.stack([e.reshape(()) for _, e in pairs if e.numel() == 1]).tolist()
        if any(e.numel() == 1 for _, e in pairs)
        else []
    )
    total, it = 0.0, iter(scalars)
    for (_, e), nk in zip(pairs, norms):
        if e.numel() == 1:
            nk = nk * next(it)
        total += nk * nk
    if reduce_sum is not None:  # sharded tensors: the partial sums of squares of every rank
        total = reduce_sum(total)
    return math.sqrt(total)
