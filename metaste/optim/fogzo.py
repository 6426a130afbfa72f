"""FOGZO: First-Order-Guided Zeroth-Order gradients for quantized weights (docs/design.md §4).

The class :class:`FOGZO` does the bookkeeping (β schedule, managed parameters, RNG and buffer
hygiene, DDP, checkpoints); the math is the plain function :func:`fogzo_estimate`, which reads
against docs/design.md §4.3 line by line. The (ε̄, p̄, sampler) table of §4.2 is in
:mod:`metaste.optim.smoothing`.

Size: ~820 lines, over the ~400 the package aims for, on purpose: one algorithm — the math
(:func:`fogzo_estimate`, ~220 lines with its sharded (FSDP2) and fused paths) and the class
whose docstring is the user manual (~100 lines) and whose ``step`` owns the RNG/buffer hygiene
of docs/design.md §4.5, the GradScaler path and the checkpoint checks. Splitting the estimate
from the class would leave two files that only make sense read together.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..quant import registry
from ..quant.registry import lookup
from ._closure import Closure, closure_value
from ._fused import FUSE_MIN, combine_many_, delta, kernel, key_halves, perturb_many_, restore_combine_many_
from ._fused import host_floats as _host_floats
from ._modules import ModuleBufferGuard
from ._snapshot import BufferGuard, RngState
from ._wrapper import OptimizerWrapper, check_latent_dtype
from .fsdp import (
    all_reduce_sum,
    as_dtensor_like,
    global_offset,
    is_dtensor,
    local,
    local_scale,
    mesh_group,
    reshard,
)
from .smoothing import SMOOTHINGS, STE_KINDS, derive_seed, noise_slice, rademacher

__all__ = ["FOGZO", "fogzo_estimate", "RESTORE_MODES"]

RESTORE_MODES = ("copy", "inplace")
ScaleSpec = Tensor | float | Callable[[], Tensor | float]


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
    not finite (the caller keeps g). Sharded tensors (FSDP2, :mod:`metaste.optim.fsdp`): ``weights``
    are the rank's shards, ``offsets[k]``/``numels[k]`` their flat offset in and the size of the full
    tensor (the noise is that slice of the full tensor's: the counter-based noise at the global
    indices offset + j, :func:`~.smoothing.noise_slice`), and
    ``reduce_sum`` sums ‖ε⊙g‖² over the ranks.

    The noise z_ik is regenerated from ``derive_seed(seed, step, i, k)`` each time it is used
    (``keep_noise=True`` keeps the n·D values instead: same result, fewer regenerations). Each
    perturbation is one pass that computes z from the element index (:func:`~metaste.optim._fused.perturb_`),
    the final G one pass for all n samples (:func:`~metaste.optim._fused.combine_`; ``"inplace"`` at
    n = 1: the same pass also restores the weights, :func:`~metaste.optim._fused.restore_combine_`); ``fused=True``
    compiles both with ``torch.compile`` (the same numbers, :mod:`metaste.optim._fused`)::

        N  = ‖ε ⊙ g‖₂ over all tensors; ĝ = ε ⊙ g / N  (0 if N is 0 or not finite)
        for i in 1..n:
            d_i = √β σ_i ĝ + √(1−β) z_i
            c_i = [L(v + ε⊙d_i) − L(v − ε⊙d_i)] / 2
        G = (1/n) Σ_i c_i d_i ⊘ ε  =  g·√β Σ_i σ_i c_i / (nN)  +  Σ_i √(1−β) c_i/n · z_i ⊘ ε
    """
    # 1. ĝ = ε⊙g / N with N = ‖ε⊙g‖ over all managed tensors jointly
    norm = _joint_norm(grads, eps, reduce_sum) if beta > 0 else 0.0
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
    # the kernels' index arguments per tensor (0-dim int32): 0 / None for whole tensors
    i32 = torch.int32
    if offsets is None and numels is None:
        offs: list = [0] * len(weights)
        nums: list = [None] * len(weights)
    else:
        offs = [torch.tensor(s0, dtype=i32) for s0 in starts]
        nums = [torch.tensor(m, dtype=i32) for m in totals]
    # the keys as int32 tensors: [i, k] halves of sample i, tensor k
    key1 = torch.tensor([[k1 for k1, _ in row] for row in keys], dtype=i32)
    key2 = torch.tensor([[k2 for _, k2 in row] for row in keys], dtype=i32)
    # the tensors of each STE kind and device: one kernel call per group and pass for all of them,
    # with the group's keys on its device
    groups: dict[tuple[str, torch.device], list[int]] = {}
    for k, (kind, v) in enumerate(zip(kinds, weights)):
        groups.setdefault((kind, v.device), []).append(k)
    group_keys = {gk: (key1[:, sel].to(gk[1]), key2[:, sel].to(gk[1])) for gk, sel in groups.items()}
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
                kinds[k], totals[k], starts[k], v.numel(), (seed, step, i, k), v.device, v.dtype
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
                    [nums[k] for k in sel],
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
                [nums[k] for k in sel],
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


def _joint_norm(
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


@dataclass(frozen=True)
class _Managed:
    param: Tensor
    scale: Callable[[], Tensor | float | None]
    kind: str
    name: str  # "parameter k (shape ...)" of the optimizer, for error messages


class FOGZO(OptimizerWrapper):
    r"""First-Order-Guided Zeroth-Order gradients (Yang & Aamodt, NeurIPS 2025) on any optimizer.

    Example::

        model = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
        opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10_000)
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))  # no backward in the closure

    For every *managed* weight (a quantized weight found in metaste's registry, or one named in
    ``scales=``) the STE gradient g is replaced by a central-difference zeroth-order estimate
    along random directions tilted toward the normalized STE gradient; every other parameter
    (biases, norms, LSQ's step s) keeps its backprop gradient and is never perturbed.
    Per step t (docs/design.md §4.3–§4.5)::

        β = β_t;  L₀ = closure() with backward → g            (RNG state saved before)
        ε = ε̄·s per managed tensor (ε̄ from its STE kind, docs/design.md §4.2)
        N = ‖ε⊙g‖ over all managed tensors;  ĝ = ε⊙g / N
        for i = 1..n:                                           (no_grad, train mode, RNG reset)
            d_i = √β σ_i ĝ + √(1−β) z_i,   σ_i = ±1, z_i ∼ p̄ per element
            c_i = [L(v + ε⊙d_i) − L(v − ε⊙d_i)] / 2          (float64; one-sided: L(v+ε⊙d_i) − L₀)
        c ← mean over DDP ranks
        v.grad = G = (1/n) Σ_i c_i d_i ⊘ ε                      (replaces g)
        optimizer.step();  return L₀

    Schedule: β_t = 1 − (1 − β_min)·min(1, t/T), T = ``total_steps``, t = 0, 1, … counts every
    ``step()`` call; steps t < ⌊``ste_fraction``·T⌋ are plain STE steps (the paper's
    "r % STE + (100 − r) % FOGZO"). n-SPSA is ``beta_schedule=lambda t: 0.0``; its clean pass
    runs without backward unless an unmanaged parameter requires grad.

    Args:
        optimizer: the base ``torch.optim.Optimizer`` (its ``param_groups`` and ``state`` are
            shared, so LR schedulers, ``zero_grad`` and ``add_param_group`` work on either).
        n (int, default 1): directions per step; a step costs 1 forward+backward + 2n no-grad
            forwards (n with ``one_sided``).
        beta_min (float, default ``None`` = 1 − 1/D, D = number of managed elements): the
            final β in [0, 1]. The paper tunes it close to 1 (0.999 for an 8k-weight MLP).
        total_steps (int, default ``None``): T, required when β decays (``beta_min < 1`` and no
            ``beta_schedule``) or ``ste_fraction > 0``.
        beta_schedule (callable, default ``None``): ``beta_schedule(t) -> float`` in [0, 1]
            overrides the linear schedule; it is not saved by ``state_dict`` (pass it again).
        ste_fraction (float, default 0.0): the fraction r of ``total_steps`` run as plain STE.
        one_sided (bool, default False): c_i = L(v + ε⊙d_i) − L₀: n instead of 2n extra
            forwards, the same expectation, more variance.
        seed (int, default 0): with the step and sample index, determines σ_i and z_i
            (identical on every DDP rank; the stream depends on the device type only).
        restore (str, default ``"copy"``): ``"copy"`` keeps a copy of the managed weights
            during the no-grad passes, restores them bitwise and mirrors v⁺ into v⁻ without
            regenerating the noise (fastest: 2 noise draws per sample); ``"inplace"`` adds
            +1, −2, +1 times ε⊙d_i (no copy, 4 draws per sample; at n = 1 the restore is the
            combine pass, which draws the same noise: 3). In-place restore cannot be
            exact: one cycle leaves each tensor within 4 ulp of its max|v|, and the rounding
            errors of many cycles add up as a random walk (measured: ≈ 17 ulp of max|v| after
            200 cycles at lr = 0), far below any learning-rate step but not bounded.
        keep_noise (bool, default False): keep the n·D noise values of a step instead of
            regenerating them: one draw per sample, n·D floats more memory, identical results.
            A step on the eager path (``fused`` off or below its threshold) with at most 2^16
            noise values keeps them anyway (the hash dominates a small step's passes).
        scales (mapping, default ``None``): manage weights metaste's registry does not know
            (a model fake-quantized by another library): ``{weight: s}`` or
            ``{weight: (s, ste_kind)}`` with s the step size (a positive float, a tensor
            broadcastable to the weight, or a zero-arg callable returning either, called every
            step) and ``ste_kind`` one of ``"identity"`` (round-based grids, the default),
            ``"hardtanh"``, ``"tanh"``, ``"approxsign"`` (binary weights). Entries override the
            registry for the same weight.
        process_group (default ``None``): the group the c_i are averaged over when
            torch.distributed is initialized (``None``: the default group).
        fused (default ``"auto"``): compile the perturbation and combine passes with
            ``torch.compile`` (one vectorised C++ loop per pass on CPU, one Triton kernel on GPU;
            the same numbers as the eager path). ``"auto"``: when the managed weights hold at least
            2^16 elements; ``True``/``False``: always / never. The first step compiles (seconds);
            a failed compile warns once and runs eagerly.
        grad_scaler (default ``None``): a ``torch.amp.GradScaler`` for fp16: backward on the scaled
            loss, unscale before ĝ and G, an inf/NaN gradient skips the step (no perturbed passes,
            no step count), then ``scaler.update()`` (docs/design.md §5.1). Do not call the
            scaler's ``step``/``update`` yourself.
        max_grad_norm (default ``None``): clip the backprop gradient (the STE gradient of the
            managed weights and the unmanaged ones) to this total norm, before the estimate; G is
            not clipped — its norm is the zeroth-order noise's (docs/design.md §5.1).
            :attr:`last_grad_norm` holds the norm before clipping.

    Notes:
        * The closure returns the loss without calling ``backward`` and may be called 1 + 2n
          times per step; each perturbed call runs under ``no_grad`` in the model's current
          (train) mode with the torch RNG reset to its state before the clean call, so dropout
          masks and random augmentations match; afterwards the RNG continues from its state
          after the clean call. Python's ``random`` and NumPy's global RNG are not reset.
        * Buffers (BatchNorm running statistics) of the modules the closure refers to (found
          without hooks, so ``torch.compile`` models keep one graph; docs/design.md §10.5) are
          restored after each perturbed pass: only the clean pass updates them.
        * Under DDP the weight gradients are already averaged by backward; FOGZO averages the
          c_i, so every rank computes the same G.
        * A non-finite L₊/L₋ keeps g for that step (with β ≡ 0 and no backward there is no g:
          the managed weights then get no gradient), counts it in :attr:`fallbacks` and
          warns once. Managed weights must be float32/float64: bf16 latents swallow the
          perturbation.
        * Gradient accumulation: the closure may yield the micro-batch losses (a generator);
          each is backpropagated as it comes and the perturbed passes loop over the same
          micro-batches (:class:`~metaste.optim.amp.Accumulated` builds such a closure). AMP:
          run the closure's forward under ``torch.autocast``; fp16 takes ``grad_scaler=`` (a
          loss scaled by the user raises).
        * ``load_state_dict`` keeps the constructor's settings: a checkpoint saved with another
          ``seed``, ``n``, ``beta_min``, ``total_steps``, ``ste_fraction`` or ``one_sided``
          raises ``ValueError`` (docs/design.md §5).
    """

    _clip_before_base_step = False  # max_grad_norm clips the backprop gradient, not G

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        n: int = 1,
        beta_min: float | None = None,
        total_steps: int | None = None,
        beta_schedule: Callable[[int], float] | None = None,
        ste_fraction: float = 0.0,
        one_sided: bool = False,
        seed: int = 0,
        restore: str = "copy",
        keep_noise: bool = False,
        scales: Mapping[Tensor, ScaleSpec | tuple[ScaleSpec, str]] | None = None,
        process_group: Any = None,
        fused: bool | str = "auto",
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Invalid n: {n!r}; the number of directions must be an int >= 1")
        if beta_min is not None and not 0.0 <= beta_min <= 1.0:
            raise ValueError(f"Invalid beta_min: {beta_min}; it must lie in [0, 1]")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"Invalid total_steps: {total_steps!r}; it must be an int >= 1")
        if not 0.0 <= ste_fraction <= 1.0:
            raise ValueError(f"Invalid ste_fraction: {ste_fraction}; it must lie in [0, 1]")
        if beta_schedule is not None and not callable(beta_schedule):
            raise TypeError(f"beta_schedule must be callable t -> beta, got {type(beta_schedule).__name__}")
        decays = beta_schedule is None and (beta_min is None or beta_min < 1.0)
        if total_steps is None and (decays or ste_fraction > 0):
            raise ValueError(
                "total_steps is required: "
                + (
                    f"ste_fraction={ste_fraction} is a fraction of it"
                    if ste_fraction > 0
                    else "β decays linearly from 1 to beta_min (default 1 - 1/D) over total_steps; "
                    "pass total_steps=<training steps>, or a constant schedule such as "
                    "beta_schedule=lambda t: 0.999"
                )
            )
        if restore not in RESTORE_MODES:
            raise ValueError(f"Invalid restore: {restore!r}; choose one of {RESTORE_MODES}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if fused not in (True, False, "auto"):
            raise ValueError(f"Invalid fused: {fused!r}; choose True, False or 'auto'")
        super().__init__(optimizer, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        self.fused = fused
        self.n = n
        self.beta_min = beta_min
        self.total_steps = total_steps
        self.beta_schedule = beta_schedule
        self.ste_fraction = float(ste_fraction)
        self.one_sided = bool(one_sided)
        self.seed = seed
        self.restore = restore
        self.keep_noise = bool(keep_noise)
        self.process_group = process_group
        self._scales = self._parse_scales(scales)
        self._warned_fallback = False
        managed = self._managed()
        if not managed:
            frozen = self._managed(include_frozen=True)
            raise ValueError(
                f"FOGZO found no managed parameters: the {len(frozen)} quantized weight(s) among the "
                "optimizer's parameters are all frozen (requires_grad=False); unfreeze them, or use "
                "the bare optimizer"
                if frozen
                else "FOGZO found no managed parameters: none of the optimizer's parameters is a "
                "quantized weight. Quantize the model with metaste.quantize_model(...) before "
                "building the optimizer, or name the fake-quantized weights with "
                "scales={weight: step_size}"
            )
        for m in managed:
            if m.scale() is not None:  # a library that sets its scales in the first forward: at step time
                self._check_scale(m)
        self.steps = 0  # t: step() calls so far
        self.fallbacks = 0  # steps that kept the STE gradient (a non-finite perturbed loss)
        # step size s per managed weight (mean over its elements): at its first FOGZO step, now
        self.initial_scales: dict[str, float] = {}
        self.scales: dict[str, float] = {}
        self._warned_scale = False
        self._step_weights: list[Tensor] = []  # the managed weights of the current step

    # -- configuration -----------------------------------------------------------------------

    def _parse_scales(self, scales: Mapping | None) -> dict[Tensor, _Managed]:
        if scales is None:
            return {}
        if not isinstance(scales, Mapping):
            raise TypeError(f"scales must be a dict weight -> s or (s, kind), got {type(scales).__name__}")
        own = {id(p) for p in self.params()}
        parsed: dict[Tensor, _Managed] = {}
        for p, spec in scales.items():
            if not isinstance(p, Tensor) or id(p) not in own:
                raise ValueError("scales= names a tensor that is not a parameter of the wrapped optimizer")
            s, kind = spec if isinstance(spec, tuple) else (spec, "identity")
            if kind not in STE_KINDS:
                raise ValueError(f"Invalid STE kind {kind!r} in scales=; choose one of {STE_KINDS}")
            fn = s if callable(s) else (lambda s=s: s)
            parsed[p] = _Managed(p, fn, kind, "")
        return parsed

    def _managed(self, include_frozen: bool = False) -> list[_Managed]:
        """The managed weights, in parameter order (registry entries or ``scales=``). Cached per
        step until the parameter list, a ``requires_grad`` / dtype or the registry changes (the
        lookups were a visible part of a small model's step)."""
        if include_frozen:
            return self._find_managed(True)
        key = (registry.version(), tuple((id(p), p.requires_grad, p.dtype) for p in self.params()))
        cached = getattr(self, "_managed_cache", None)
        if cached is None or cached[0] != key:
            cached = self._managed_cache = (key, self._find_managed(False))
        return cached[1]

    def _find_managed(self, include_frozen: bool) -> list[_Managed]:
        out = []
        for k, p in enumerate(self.params()):
            if not p.requires_grad and not include_frozen:
                continue
            name = f"parameter {k} (shape {tuple(p.shape)})"
            m = self._scales.get(p)
            if m is None:
                entry = lookup(p)
                if entry is None:
                    continue
                m = _Managed(p, entry.scale, entry.ste_kind, name)
            else:
                m = _Managed(p, m.scale, m.kind, name)
            check_latent_dtype(p, "FOGZO", name)
            out.append(m)
        return out

    def _managed_params(self) -> list[Tensor]:
        return self._step_weights

    def _eps(self, m: _Managed) -> Tensor:
        s = local_scale(m.scale(), m.param)  # FSDP2: the rows of this rank's shard
        if s is None:
            raise ValueError(
                f"the step size of the managed weight {m.name} is None: it is not initialised yet "
                "(torchao and similar libraries set their scales in the first forward). Pass a "
                "callable in scales= that returns the current step once it exists; FOGZO reads it "
                "after each step's clean forward"
            )
        s = torch.as_tensor(s, dtype=m.param.dtype, device=m.param.device).detach()
        return s * SMOOTHINGS[m.kind].eps_bar

    def _check_scale(self, m: _Managed) -> None:
        e = self._eps(m)
        try:
            torch.broadcast_shapes(e.shape, local(m.param).shape)
        except RuntimeError as err:
            raise ValueError(
                f"the step size of the managed weight {m.name} has shape {tuple(e.shape)}, "
                "which does not broadcast to it"
            ) from err
        if not bool(torch.all(e > 0) & torch.all(torch.isfinite(e))):
            raise ValueError(f"the step size of the managed weight {m.name} must be finite, > 0")

    def beta_at(self, t: int, num_managed: int | None = None) -> float:
        """β_t (docs/design.md §4.4); ``num_managed`` = D for the default β_min = 1 − 1/D."""
        if self.beta_schedule is not None:
            beta = float(self.beta_schedule(t))
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta: beta_schedule({t}) = {beta}; it must lie in [0, 1]")
            return beta
        if num_managed is None:
            num_managed = sum(m.param.numel() for m in self._managed())
        beta_min = self.beta_min if self.beta_min is not None else 1.0 - 1.0 / num_managed
        if beta_min == 1.0:
            return 1.0
        return 1.0 - (1.0 - beta_min) * min(1.0, t / self.total_steps)

    # -- the step ----------------------------------------------------------------------------

    def _closure_reason(self) -> str:
        return "to evaluate the loss again at perturbed weights"

    def _update(self, closure: Closure | None) -> Tensor:
        """One FOGZO step on ``closure`` (returns the loss, no backward; or a generator of
        micro-batch losses); returns the clean loss. If it raises, no weight, buffer or optimizer
        state has changed."""
        assert closure is not None  # step() refuses a missing one (_closure_reason)
        name = type(self).__name__
        t = self.steps
        if t < math.floor(self.ste_fraction * (self.total_steps or 0)):
            loss = self._evaluate(closure)
            self._clip()
            self.optimizer.step()
            self.steps = t + 1
            return loss
        managed = self._managed()
        if not managed:
            raise ValueError(
                "FOGZO has no managed weight to train: every quantized weight it manages is frozen "
                "(requires_grad=False) now; unfreeze one, or step the bare optimizer (opt.optimizer)"
            )
        d_managed = sum(m.param.numel() for m in managed)
        beta = self.beta_at(t, d_managed)
        weights = [m.param for m in managed]
        self._step_weights = weights
        is_managed = {id(p) for p in weights}
        needs_backward = beta > 0 or any(p.requires_grad and id(p) not in is_managed for p in self.params())
        devices = {p.device for p in weights}
        rng_before = RngState(devices)
        loss = self._evaluate(closure, backward=needs_backward)
        self._clip()  # the backprop gradient, not G (docs/design.md §5.1)
        rng_after = RngState(devices)
        all_grads = [(p, p.grad) for p in self.params()]
        try:
            eps = [self._eps(m) for m in managed]
            for m in managed:
                if m.param in self._scales:  # a user's callable can change (the registry's s cannot be <= 0)
                    self._check_scale(m)
        except BaseException:
            self._zero_grads()
            raise
        self._track_scales(managed, eps, t)

        def loss_at() -> float:
            rng_before.restore()
            with torch.no_grad():
                value = closure_value(closure, name)
            if sharded:  # FSDP2: the next pass must gather the next perturbation
                reshard(modules)
            buffers.restore()
            return value

        # the buffers of the modules the step guard found; a global forward hook only as the
        # fallback (it cannot be traced through torch.compile: docs/design.md §10.5)
        modules = self._step_modules or []
        # FSDP2 (docs/design.md §10.4): the rank's shards, their offsets, the norm summed over ranks
        sharded = [p for p in weights if is_dtensor(p)]
        if sharded and not modules:
            raise ValueError(
                "FOGZO over FSDP2-sharded weights needs to find the model in the closure (to reshard it "
                "between the perturbed passes); let the closure refer to the model, e.g. "
                "opt.step(lambda: loss_fn(model(x), y))"
            )
        group = mesh_group(sharded[0]) if sharded else None
        with torch.no_grad(), ModuleBufferGuard(modules) if modules else BufferGuard() as buffers:
            try:
                G, c = fogzo_estimate(
                    [local(p) for p in weights],
                    [None if p.grad is None else local(p.grad) for p in weights],
                    eps,
                    [m.kind for m in managed],
                    loss_at,
                    beta=beta,
                    n=self.n,
                    seed=self.seed,
                    step=t,
                    one_sided=self.one_sided,
                    loss0=float(loss),
                    restore=self.restore,
                    keep_noise=self.keep_noise,
                    reduce=lambda c: self._all_reduce_mean(c, weights[0].device),
                    fused=self.fused is True or (self.fused == "auto" and d_managed >= FUSE_MIN),
                    offsets=[global_offset(p) for p in weights] if sharded else None,
                    numels=[p.numel() for p in weights] if sharded else None,
                    reduce_sum=(lambda x: all_reduce_sum(x, group, weights[0].device)) if sharded else None,
                )
            finally:
                rng_after.restore()
                for p, g in all_grads:  # a closure that zeroes grads (set_to_none) cannot lose them
                    p.grad = g
        if G is None:
            self.fallbacks += 1
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    f"FOGZO step {t}: a perturbed loss was not finite (c = {c.tolist()}); kept the STE "
                    "gradient for this step (counted in FOGZO.fallbacks; warning once)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            for p, g in zip(weights, G):
                if not is_dtensor(p):
                    p.grad = g
                elif (
                    p.grad is None or local(p.grad).data_ptr() != g.data_ptr()
                ):  # G was not computed in place
                    p.grad = as_dtensor_like(g, p)
        self.optimizer.step()
        self.steps = t + 1
        return loss

    #: a managed weight's step size that moved by this factor (either way) since its first FOGZO
    #: step triggers the run-away warning
    SCALE_ALARM = 10.0

    def _track_scales(self, managed: list[_Managed], eps: list[Tensor], t: int) -> None:
        """Record each managed weight's step size s (mean) and warn once when one has grown or
        shrunk by :attr:`SCALE_ALARM` or more since its first FOGZO step. The run-away it flags:
        FOGZO's noise term moves every managed weight by about lr·√((1−β)D)·|∇L| per step
        whatever s is, so the weights diffuse past the grid's range; a learned step (LSQ) follows
        them out (its gradient from clipped weights pushes s up), and a coarser grid on the
        logits layer can collapse the model (docs/design.md §4.4)."""
        means = _host_floats([e.reshape(()) if e.numel() == 1 else e.mean() for e in eps])
        for m, e_mean in zip(managed, means):
            s = e_mean / SMOOTHINGS[m.kind].eps_bar
            self.scales[m.name] = s
            s0 = self.initial_scales.setdefault(m.name, s)
            ratio = s / s0 if s0 > 0 else math.inf
            if not self._warned_scale and not 1 / self.SCALE_ALARM < ratio < self.SCALE_ALARM:
                self._warned_scale = True
                warnings.warn(
                    f"FOGZO step {t}: the step size of the managed weight {m.name} moved from {s0:.3g} to "
                    f"{s:.3g} ({ratio:.3g}x) since its first FOGZO step. FOGZO's noise spreads the weights "
                    "and a learned step (LSQ) follows them; if the loss rises, use quantizer='fixed', keep "
                    "the last layer in float (keep_last=True), give the step sizes a lower lr, or raise "
                    "beta_min (FOGZO.diagnostics['step_sizes']; warning once)",
                    RuntimeWarning,
                    stacklevel=4,
                )

    @property
    def diagnostics(self) -> dict[str, Any]:
        """``{"step", "fallbacks", "step_sizes": {weight: {"initial", "current", "ratio"}}}``: the
        step size s (mean) of each managed weight at its first FOGZO step and now; a ratio far
        from 1 (≥ 10× either way warns) flags a run-away learned step."""
        sizes = {
            k: {
                "initial": s0,
                "current": self.scales[k],
                "ratio": self.scales[k] / s0 if s0 > 0 else math.inf,
            }
            for k, s0 in self.initial_scales.items()
            if k in self.scales
        }
        return {"step": self.steps, "fallbacks": self.fallbacks, "step_sizes": sizes}

    def _all_reduce_mean(self, c: Tensor, device: torch.device) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return c
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return c
        on_device = c.to(device)
        dist.all_reduce(on_device, group=self.process_group)
        return on_device.cpu() / world

    # -- checkpoints -------------------------------------------------------------------------

    #: the settings that define the trajectory: a checkpoint must match the constructor's
    SETTINGS = ("seed", "n", "beta_min", "total_steps", "ste_fraction", "one_sided")

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "fallbacks": self.fallbacks,
            "initial_scales": dict(self.initial_scales),
        }

    def _check_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        super()._check_wrapper_state_dict(state)
        missing = [k for k in ("steps", "fallbacks") if k not in state]
        if missing:
            raise ValueError(f"FOGZO state_dict['metaste'] lacks {missing}: it is not a FOGZO checkpoint")

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the step count and the fallback count (the settings were checked to match the
        constructor's, :meth:`_check_wrapper_state_dict`)."""
        self.steps = state["steps"]
        self.fallbacks = state["fallbacks"]
        self.initial_scales = dict(state.get("initial_scales", {}))

    def __repr__(self) -> str:
        return (
            f"FOGZO(n={self.n}, beta_min={self.beta_min}, total_steps={self.total_steps}, "
            f"one_sided={self.one_sided}, restore={self.restore!r}, {self.optimizer!r})"
        )
