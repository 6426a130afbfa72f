"""The FOGZO estimate as a plain function (docs/design.md §4.3): :func:`fogzo_estimate` reads
against the formula line by line, with its sharded (FSDP2) and fused paths, and the joint norm
N = ‖ε ⊙ g‖₂ over all managed tensors. The class that schedules β and keeps the RNG, buffers and
checkpoints is :class:`metaste.optim.fogzo.FOGZO`; the (ε̄, p̄, sampler) table of §4.2 is in
:mod:`metaste.optim.fogzo.smoothing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..._compile import FUSE_MIN, kernel
from ..core.noise import derive_seed, key_halves, noise_slice, rademacher
from .passes import combine_many_, delta, perturb_many_, restore_combine_many_

__all__ = ["fogzo_estimate"]


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
    offsets: Sequence[int] | None = None,
    numels: Sequence[int] | None = None,
    reduce_sum: Callable[[float], float] | None = None,
) -> tuple[list[Tensor] | None, Tensor]:
    """The FOGZO estimate G of docs/design.md §4.3 for the managed tensors ``weights`` (v_k).

    ``grads[k]`` is the STE gradient g_k (``None``: zero), ``eps[k]`` = ε̄·s_k (broadcastable to
    v_k), ``kinds[k]`` its STE kind, ``loss_at()`` the loss at the current (perturbed) weights
    as a float. The weights are perturbed in place and restored (``restore="copy"``: bitwise;
    ``"inplace"``: +1, −2, +1, within 4 ulp of max|v| per cycle); ``loss_at`` is called 2n times (n if
    ``one_sided``, then c_i = L₊ − ``loss0``). ``reduce`` averages the c_i across processes.
    ``grads`` are overwritten with G. Returns (G per tensor, c), or (None, c) if some c_i is
    not finite (the caller keeps g). Sharded tensors (FSDP2, :mod:`metaste.optim.core.fsdp`): ``weights``
    are the rank's shards, ``offsets[k]``/``numels[k]`` their flat offset in and the size of the full
    tensor (the noise is that slice of the full tensor's: the counter-based noise at the global
    indices offset + j, :func:`~.smoothing.noise_slice`), and
    ``reduce_sum`` sums ‖ε⊙g‖² over the ranks.

    The noise z_ik is regenerated from ``derive_seed(seed, step, i, k)`` each time it is used
    (``keep_noise=True`` keeps the n·D values instead: same result, fewer regenerations). Each
    perturbation is one pass that computes z from the element index (:func:`~metaste.optim.fogzo.passes.perturb_`),
    the final G one pass for all n samples (:func:`~metaste.optim.fogzo.passes.combine_`; ``"inplace"`` at
    n = 1: the same pass also restores the weights, :func:`~metaste.optim.fogzo.passes.restore_combine_`); ``fused=True``
    compiles both with ``torch.compile`` (the same numbers, :mod:`metaste.optim.fogzo.passes`)::

        N  = ‖ε ⊙ g‖₂ over all tensors; ĝ = ε ⊙ g / N  (0 if N is 0 or not finite)
        for i in 1..n:
            d_i = √β σ_i ĝ + √(1−β) z_i
            c_i = [L(v + ε⊙d_i) − L(v − ε⊙d_i)] / 2
        G = (1/n) Σ_i c_i d_i ⊘ ε  =  g·√β Σ_i σ_i c_i / (nN)  +  Σ_i √(1−β) c_i/n · z_i ⊘ ε
    """
    # 1. ĝ = ε⊙g / N with N = ‖ε⊙g‖ over all managed tensors jointly
    norm = joint_norm(grads, eps, reduce_sum) if beta > 0 else 0.0
    inv_norm = 1.0 / norm if 0.0 < norm < math.inf else 0.0
    # ε⊙d_i = a σ_i (ε²⊙g) + b (ε⊙z_i): a = √β/N, b = √(1−β)
    a, b = math.sqrt(beta) * inv_norm, math.sqrt(1.0 - beta)
    sigmas = [rademacher(seed, step, i) for i in range(n)]
    eps2 = [e * e for e in eps]
    beps = [e * b for e in eps]
    keys = [[key_halves(derive_seed(seed, step, i, k)) for k in range(len(weights))] for i in range(n)]
    kept: dict[tuple[int, int], Tensor] = {}
    # the eager path on a small step keeps the noise it draws (at most FUSE_MIN values; the same
    # numbers as regenerating them): one hash per sample instead of 2–4, the bulk of its time
    keep = keep_noise or (not fused and n * sum(v.numel() for v in weights) <= FUSE_MIN)
    # a shard (FSDP2) draws the full tensor's noise at its global indices offset + j
    starts = [0] * len(weights) if offsets is None else list(offsets)
    totals = [v.numel() for v in weights] if numels is None else list(numels)
    for v, s0, m in zip(weights, starts, totals):
        if not 0 <= s0 <= s0 + v.numel() <= m < 1 << 31:
            raise ValueError(
                f"a shard of {v.numel()} elements at offset {s0} does not fit a tensor of {m} elements "
                "(FOGZO's noise indexes elements with int32: at most 2^31 - 1)"
            )
    # the kernels' index offsets per tensor (0-dim int32): 0 for whole tensors
    i32 = torch.int32
    offs: list = [0] * len(weights) if offsets is None else [torch.tensor(s0, dtype=i32) for s0 in starts]
    # the keys as int32 tensors: [i, k] halves of sample i, tensor k
    key1 = torch.tensor([[k1 for k1, _ in row] for row in keys], dtype=i32)
    key2 = torch.tensor([[k2 for _, k2 in row] for row in keys], dtype=i32)
    # the tensors of each STE kind and device: one kernel call per group and pass for all of them,
    # with the group's keys on its device
    groups: dict[tuple[str, torch.device], list[int]] = {}
    for k, (kind, v) in enumerate(zip(kinds, weights)):
        groups.setdefault((kind, v.device), []).append(k)
    every = list(range(len(weights)))  # the usual single group: no gather
    group_keys = {
        gk: (key1, key2) if sel == every else (key1[:, sel], key2[:, sel]) for gk, sel in groups.items()
    }
    group_keys = {gk: (k1.to(gk[1]), k2.to(gk[1])) for gk, (k1, k2) in group_keys.items()}
    scalars: dict[tuple[str, float, torch.dtype, torch.device], Tensor] = {}

    def scalar(x: float, like: Tensor, role: str = "") -> Tensor:
        # a 0-dim tensor (one compiled kernel for all values), one per role, value, dtype and
        # device: the lists a kernel gets alias the same way at every call (no recompiles)
        key = (role, x, like.dtype, like.device)
        if key not in scalars:
            scalars[key] = torch.tensor(x, dtype=like.dtype, device=like.device)
        return scalars[key]

    def z(i: int, k: int) -> Tensor:  # keep_noise: the stored z_ik (a shard's: its slice of the full z)
        if (i, k) not in kept:
            v = weights[k]
            kept[(i, k)] = noise_slice(
                kinds[k], starts[k], v.numel(), derive_seed(seed, step, i, k), v.device, v.dtype
            ).view(v.shape)
        return kept[(i, k)]

    def shift(i: int, alpha: float, ks: Sequence[int] | None = None) -> None:
        # v += alpha · ε⊙d_i, one pass per tensor (``ks``: only those tensors, eagerly: the same
        # numbers, and no compiled variant for a subset that only an error asks for)
        if b == 0.0:  # β = 1: d_i = σ_i ĝ, no noise
            for k in range(len(weights)) if ks is None else ks:
                if grads[k] is not None:
                    weights[k].add_(grads[k] * (eps2[k] * (a * sigmas[i])), alpha=alpha)
            return
        if keep:
            for k in range(len(weights)) if ks is None else ks:
                v, gk = weights[k], grads[k] if a != 0.0 else None
                v.add_(
                    delta(z(i, k), gk, eps2[k], beps[k], scalar(a * sigmas[i], v, "a_sig"))
                    * scalar(alpha, v, "alpha")
                )
            return
        for (kind, _), group in groups.items():
            pos = [j for j, k in enumerate(group) if ks is None or k in ks]
            if pos:
                sel = [group[j] for j in pos]
                k1s, k2s = group_keys[(kind, _)]
                kernel(perturb_many_, kind, fused and ks is None)(
                    [weights[k] for k in sel],
                    [grads[k] if a != 0.0 else None for k in sel],
                    [eps2[k] for k in sel],
                    [beps[k] for k in sel],
                    [scalar(a * sigmas[i], weights[k], "a_sig") for k in sel],
                    [scalar(alpha, weights[k], "alpha") for k in sel],
                    k1s[i] if ks is None else k1s[i, pos],
                    k2s[i] if ks is None else k2s[i, pos],
                    kind,
                    [offs[k] for k in sel],
                )

    # 2. c_i from 2 (one-sided: 1) no-grad passes at v ± ε⊙d_i
    originals = [v.clone() for v in weights] if restore == "copy" else None
    # in-place restore, n = 1: the restoring pass is also the combine pass of step 3 (it computes
    # the same noise), so it waits for c; ``pending`` are the tensors not yet restored. (n > 1
    # would save one of 4n draws and give the compiled kernel one more variant per n: Dynamo's
    # recompile limit, shared by all calls of a function, then turns every fused pass eager.)
    fuse_last = originals is None and not keep and b != 0.0 and n == 1
    pending = list(range(len(weights)))
    c = torch.empty(n, dtype=torch.float64)
    offset = (0, 0.0)  # (i, m): the weights ``pending`` are now v + m·ε⊙d_i
    try:
        for i in range(n):
            shift(i, 1.0)
            offset = (i, 1.0)
            plus = loss_at()
            if one_sided:
                c[i] = plus - loss0
            else:
                if originals is not None:
                    for v, v0 in zip(weights, originals):
                        v.lerp_(v0, 2.0)  # v0 − (v⁺ − v0): the mirror image, no regeneration
                else:
                    shift(i, -2.0)
                offset = (i, -1.0)
                c[i] = (plus - loss_at()) / 2
            if originals is not None:
                for v, v0 in zip(weights, originals):
                    v.copy_(v0)
            elif fuse_last and i == n - 1:
                break  # restored with the combine below (or by ``finally``)
            else:
                shift(i, -offset[1])
            offset = (i, 0.0)
        originals = None  # every tensor is restored: the copies are freed
        if reduce is not None:
            c = reduce(c)
        if not bool(torch.isfinite(c).all()):
            return None, c

        # 3. G = g·√β Σσ_i c_i/(nN) + Σ_i √(1−β) c_i/n · z_i ⊘ ε   (replaces g)
        cs = c.tolist()
        scale_g = a * sum(s * ci for s, ci in zip(sigmas, cs)) / n
        Gs = [grads[k] if grads[k] is not None else torch.zeros_like(v) for k, v in enumerate(weights)]
        zero = scale_g == 0.0  # ĝ = 0: drop g (even a non-finite one) exactly
        if b == 0.0 or keep:
            for k, G in enumerate(Gs):
                G.zero_() if zero else G.mul_(scale_g)
                if b != 0.0:
                    for i in range(n):
                        G.add_((scalar(b * cs[i] / n, G) * z(i, k)) / eps[k])
            return Gs, c
        vals = {}  # per dtype and device: b·c_i/n
        for G in Gs:
            if (G.dtype, G.device) not in vals:
                vals[(G.dtype, G.device)] = torch.tensor(
                    [b * ci / n for ci in cs], dtype=G.dtype, device=G.device
                )
        for (kind, dev), sel in groups.items():
            k1s, k2s = group_keys[(kind, dev)]
            common = (
                [Gs[k] for k in sel],
                [eps[k] for k in sel],
                [scalar(scale_g, Gs[k], "scale_g") for k in sel],
                zero,
                [vals[(Gs[k].dtype, Gs[k].device)] for k in sel],
                k1s.T.contiguous(),
                k2s.T.contiguous(),
                kind,
                [offs[k] for k in sel],
            )
            if fuse_last and offset[1] != 0.0:
                i = n - 1
                kernel(restore_combine_many_, kind, fused)(
                    [weights[k] for k in sel],
                    [grads[k] if a != 0.0 else None for k in sel],
                    [eps2[k] for k in sel],
                    [beps[k] for k in sel],
                    [scalar(a * sigmas[i], weights[k], "a_sig") for k in sel],
                    [scalar(-offset[1], weights[k], "alpha") for k in sel],
                    k1s[i],
                    k2s[i],
                    *common,
                )
                pending = [k for k in pending if k not in sel]
            else:
                kernel(combine_many_, kind, fused)(*common)
        return Gs, c
    finally:
        if offset[1] != 0.0 and pending:  # a pass raised (or c is not finite): put the weights back
            if restore == "copy":
                for k in pending:
                    weights[k].copy_(originals[k])  # type: ignore[index]
            else:
                shift(offset[0], -offset[1], pending)


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
