"""``method="lgatt"`` (docs/design.md §3.4; thesis 4.5 LGATT = FLAGU 5.3): every θ_t of a
replayed horizon gets the hypergradient of the horizon's final loss.

The replay protocol is :class:`~.horizon.HorizonMethod`; the two adjoint sweeps are plain
functions over the recorded :class:`Trace`: :func:`reverse_sweep` (``hessian="exact"``) and
:func:`diagonal_sweep` (``hessian="diag"``, the thesis's element-wise approximation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..core.closure import Closure, summed_loss
from ..core.snapshot import Snapshot
from ._common import Evaluate, ManagedWeight
from ._options import runs
from .diffopt import UpdateRecord, differentiable_step, differentiable_update
from .horizon import HorizonMethod
from .horizon_options import HorizonOptions

__all__ = ["LGATT", "LGATTMethod", "Trace", "reverse_sweep", "diagonal_sweep", "HESSIANS"]

HESSIANS = ("exact", "diag")


@dataclass(frozen=True)
class LGATT(HorizonOptions):
    """Options of ``method="lgatt"`` (docs/design.md §3.4): the horizon options
    (:class:`~.horizon_options.HorizonOptions`; defaults ``replays=50``, ``schedule="per_step"``) and

    Args:
        hessian: ``"exact"`` (default; a reverse sweep, one HVP per step) or ``"diag"`` (the
            thesis's element-wise approximation; SGD without momentum).
        seed: seeds the ``"diag"`` probes (default 0).

    ``boundary="window"`` is refused: the sweep differentiates ψ by autograd.
    """

    name = "lgatt"

    hessian: str = "exact"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hessian not in HESSIANS:
            raise ValueError(f"Invalid hessian: {self.hessian!r}; choose one of {HESSIANS}")
        if self.boundary == "window":
            raise ValueError(
                "method='lgatt' differentiates ψ by autograd when it recomputes a step, which gives "
                "SLSTE's boundary='none' derivative; boundary='window' is not available for it"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def check(self, optimizer: Optimizer, managed: list[ManagedWeight], model: nn.Module | None) -> None:
        super().check(optimizer, managed, model)
        if self.hessian != "diag":
            return
        bad = [
            g
            for g in optimizer.param_groups
            if not isinstance(optimizer, torch.optim.SGD)
            or g.get("momentum", 0) != 0
            or g.get("nesterov", False)
            or g.get("maximize", False)
        ]
        if bad:
            raise ValueError(
                "hessian='diag' is the thesis's SGD derivation (λ_t = (1 − η_w d_t) ⊙ λ_{t+1}): it needs "
                f"torch.optim.SGD without momentum, nesterov or maximize, got {type(optimizer).__name__}; "
                "use hessian='exact' (any torch.optim optimizer)"
            )


@dataclass
class Trace:
    """A replay's recorded steps, what the sweeps read. ``snaps[t]``: parameters, optimizer state,
    buffers and RNG before step t's closure; ``hparams[t][g]``: group g's hyperparameters at
    step t; ``theta_at(t)``: θ_t per surrogate tensor; ``slices[i]``: managed weight i's
    surrogate tensors."""

    snaps: list[Snapshot]
    closures: list[Closure]
    hparams: list[list[dict[str, Any]]]
    group_index: list[int]
    optimizer_cls: type[Optimizer]
    params: list[Tensor]
    buffers: list[Tensor]
    managed: list[ManagedWeight]
    slices: list[slice]
    theta_at: Callable[[int], list[Tensor]]

    def recompute(self, t: int) -> list[list[Tensor]]:
        """Set the model to step t's stored inputs (parameters, buffers, RNG) and return fresh
        autograd leaves holding θ_t, one list per managed weight."""
        snap = self.snaps[t]
        with torch.no_grad():
            for p, x in zip(self.params, snap.params):
                p.copy_(x)
            for b, x in zip(self.buffers, snap.buffers):
                b.copy_(x)
        snap.rng.restore()
        theta = self.theta_at(t)
        return [
            [theta[k].detach().clone().requires_grad_() for k in range(sl.start, sl.stop)]
            for sl in self.slices
        ]

    def record(self, t: int, idx: list[int], states: list[dict[str, Any]]) -> UpdateRecord:
        """The UpdateRecord of step t for the parameters ``idx`` (stored v_t, hyperparameters)."""
        groups = self.hparams[t]
        return UpdateRecord(
            self.optimizer_cls,
            [self.snaps[t].params[j] for j in idx],
            states,
            [groups[self.group_index[j]] for j in idx],
        )


@contextmanager
def surrogates_as(managed: list[ManagedWeight], values: list[list[Tensor]]) -> Iterator[None]:
    """Temporarily make every managed surrogate use ``values`` (tensors that may require grad) as
    its parameters, applied inside the quantizer's backward (``defer_surrogate=False``), so that
    autograd sees ψ(u; θ) in the gradient and in the chain ∂v̂/∂v of a double backward."""
    saved = []
    for mw, vals in zip(managed, values):
        s = mw.surrogate
        saved.append((mw, [getattr(s, n) for n in s.param_names], mw.quantizer.defer_surrogate))
        for n, v in zip(s.param_names, vals):
            setattr(s, n, v)  # a registered buffer name: the module stores the tensor as the buffer
        mw.quantizer.defer_surrogate = False
    try:
        yield
    finally:
        for mw, bufs, defer in saved:
            for n, b in zip(mw.surrogate.param_names, bufs):
                setattr(mw.surrogate, n, b)
            mw.quantizer.defer_surrogate = defer


def rademacher_probe(like: Tensor, seed: int, *keys: int) -> Tensor:
    """z ∈ {±1}^shape, seeded by (seed, *keys): the Hutchinson probe of :func:`diagonal_sweep`."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    z = torch.randint(0, 2, like.shape, generator=g).to(like.dtype).mul_(2).sub_(1)
    return z.to(like.device)


def reverse_sweep(trace: Trace, lam_f: dict[int, Tensor]) -> Iterator[tuple[int, dict[int, Tensor | None]]]:
    """The exact adjoint sweep: for t = F−1 … 0, recompute step t with θ_t as leaves and take one
    vector-Jacobian product of x_{t+1} = OPT(x_t, ∇L_t(x_t; θ_t)) with (λ_{t+1}, λ^state_{t+1});
    yields (t, {surrogate tensor index: h_t}) with h_t = ∂L_F/∂θ_t. ``lam_f``: λ_F per parameter
    index. Leaves the parameters at step 0's inputs."""
    params = trace.params
    lam_x = [lam_f.get(j, torch.zeros_like(p)) for j, p in enumerate(params)]
    lam_s: list[dict[str, Tensor]] = [{} for _ in params]  # L_F does not depend on the state
    for t in reversed(range(len(trace.snaps))):
        snap = trace.snaps[t]
        leaves = trace.recompute(t)
        with surrogates_as(trace.managed, leaves), torch.enable_grad():
            loss = summed_loss(trace.closures[t](), "HyperSTE")
            req = [j for j, p in enumerate(params) if p.requires_grad]
            grads = torch.autograd.grad(loss, [params[j] for j in req], create_graph=True, allow_unused=True)
            idx = [j for j, g in zip(req, grads) if g is not None]  # the optimizer skips the others
            grads = [g for g in grads if g is not None]
            states, st_leaves = [], []
            for j in idx:
                st, lv = {}, {}
                for k, v in snap.states[j].items():
                    # every float state tensor is differentiable but the step counter
                    if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                        lv[k] = st[k] = v.detach().clone().requires_grad_()
                    else:
                        st[k] = v
                states.append(st)
                st_leaves.append(lv)
            new_x, new_s = differentiable_step(
                trace.record(t, idx, states), grads, params=[params[j] for j in idx], states=states
            )
            outs, gouts = [], []
            for n, j in enumerate(idx):
                outs.append(new_x[n])
                gouts.append(lam_x[j])
                for k, lam in lam_s[j].items():
                    v = new_s[n].get(k)
                    if isinstance(v, Tensor) and v.requires_grad:
                        outs.append(v)
                        gouts.append(lam)
            st_flat = [(n, k, leaf) for n, lv in enumerate(st_leaves) for k, leaf in lv.items()]
            theta_flat = [x for lv in leaves for x in lv]
            inputs = [params[j] for j in idx] + [leaf for _, _, leaf in st_flat] + theta_flat
            gs = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
        m, s = len(idx), len(st_flat)
        for n, j in enumerate(idx):
            lam_x[j] = gs[n] if gs[n] is not None else torch.zeros_like(params[j])
            lam_s[j] = {}
        for (n, k, leaf), g in zip(st_flat, gs[m : m + s]):
            lam_s[idx[n]][k] = g if g is not None else torch.zeros_like(leaf)
        yield t, dict(enumerate(gs[m + s :]))


def diagonal_sweep(
    trace: Trace, lam_f: dict[int, Tensor], probe: Callable[[Tensor, int, int], Tensor]
) -> Iterator[tuple[int, dict[int, Tensor | None]]]:
    """The thesis's element-wise sweep (eqs. 4.18–4.22; SGD without momentum): adjoints of the
    managed weights only, μ_t = (1 − η_w,t·(d_t + wd_t)) ⊙ μ_{t+1} with d_t = z ⊙ (H_t z) and
    z = ``probe(weight, t, i)``; yields (t, {surrogate tensor index: h_t}) like
    :func:`reverse_sweep`."""
    params, managed, slices = trace.params, trace.managed, trace.slices
    pos = {id(p): j for j, p in enumerate(params)}
    mu = {i: lam_f.get(pos[id(mw.param)], torch.zeros_like(mw.param)) for i, mw in enumerate(managed)}
    for t in reversed(range(len(trace.snaps))):
        snap = trace.snaps[t]
        leaves = trace.recompute(t)
        with surrogates_as(managed, leaves), torch.enable_grad():
            loss = summed_loss(trace.closures[t](), "HyperSTE")
            grads = torch.autograd.grad(
                loss, [mw.param for mw in managed], create_graph=True, allow_unused=True
            )
            used = [i for i, g in enumerate(grads) if g is not None]
            js = [pos[id(managed[i].param)] for i in used]
            v_next = differentiable_update(
                trace.record(t, js, [snap.states[j] for j in js]), [grads[i] for i in used]
            )
            ks = [k for i in used for k in range(slices[i].start, slices[i].stop)]
            hs = torch.autograd.grad(
                v_next,
                [
                    leaves[i][k - slices[i].start]
                    for i in used
                    for k in range(slices[i].start, slices[i].stop)
                ],
                grad_outputs=[mu[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
            zs = [probe(managed[i].param, t, i) for i in used]
            hz = torch.autograd.grad(
                [grads[i] for i in used], [managed[i].param for i in used], grad_outputs=zs, allow_unused=True
            )
        for i, j, z, hzi in zip(used, js, zs, hz):
            d = z * hzi if hzi is not None else torch.zeros_like(z)
            hp = trace.hparams[t][trace.group_index[j]]
            mu[i] = mu[i] * (1 - float(hp["lr"]) * (d + float(hp.get("weight_decay", 0.0))))
        yield t, dict(zip(ks, hs))


@runs(LGATT)
class LGATTMethod(HorizonMethod):
    """The runtime of ``method="lgatt"`` (docs/design.md §3.4; thesis 4.5 LGATT = FLAGU 5.3): every θ_t of the horizon gets
    the hypergradient of the final loss L_F — F = T with an ``extra_*`` rule (L_T on the extra
    batch), else F = T−1 (the horizon's last loss; θ_{T−1} then does not affect it and follows
    the carry/ste rule)::

        ∂L_F/∂θ_j = λ_{j+1}ᵀ ∂x_{j+1}/∂θ_j,   λ_F = ∇L_F,   λ_t = (∂x_{t+1}/∂x_t)ᵀ λ_{t+1}

    with x_t = (all parameters, optimizer state) and x_{t+1} = OPT(x_t, ∇L_t(x_t) with ψ(u_t; θ_t)).
    For SGD on the managed weights alone this is λ_t = (I − η_w H_t) λ_{t+1}.

    ``hessian="exact"``: :func:`reverse_sweep`. During the replay each step stores x_t, its buffers, the
    group hyperparameters and the RNG state before its closure (T × |x| memory, no graph). After
    it, for t = F−1 … 0: restore x_t, recompute step t on its batch with θ_t as autograd leaves and
    ψ applied inside the quantizer's backward (so every ∂v̂/∂v, also the one inside g_t, is the
    surrogate ψ(u_t; θ_t): H_t = ∂(g_t ⊙ ψ_t)/∂v_t of the surrogate gradient), build x_{t+1} by
    :func:`~metaste.optim.hyper.diffopt.differentiable_step` (differentiable in v_t, the optimizer
    state and θ_t) and take ONE vector-Jacobian product with (λ_{t+1}, λ^state_{t+1}): it gives
    λ_t, λ^state_t and h_t (one Hessian-vector product per step). Only one step's graph exists at
    a time: memory grows as T × |x|, not with an unrolled create_graph trajectory. On the smooth
    stand-in model (forward Ψ with Ψ' = ψ) this is the exact derivative of L_F (tested against
    finite differences with SGD and Adam). Two approximations remain: SLSTE's ∂ψ/∂a is autograd's
    (``boundary="none"``; ``"window"`` is refused) and, for Adam-like optimizers, elements with an
    exactly zero surrogate gradient enter the update as constants (``diffopt``'s masking).

    ``hessian="diag"``: :func:`diagonal_sweep` (the thesis's element-wise approximation, eqs. 4.18–4.22: products of
    (1 − η_w ∂²L_t/∂v_t²)): the same sweep restricted to the managed weights and SGD without
    momentum, with H_t replaced by diag(d_t), where d_t = z ⊙ (H_t z) is a one-probe Hutchinson
    estimate of the diagonal of the surrogate Hessian H_t (z Rademacher, seeded by
    (seed, horizon, replay, t); d_t is exact when H_t is diagonal and unbiased otherwise)::

        μ_F = λ_F (managed weights),  h_t = ⟨μ_{t+1}, ∂v_{t+1}/∂θ_t⟩ (diffopt),
        μ_t = (1 − η_w,t·(d_t + wd_t)) ⊙ μ_{t+1}

    The adjoints of every other parameter are dropped. The thesis accumulates the products forward
    in time after each backward; with element-wise products the backward scan gives the same
    numbers. Its cost equals ``"exact"``'s (one HVP per step): it exists for fidelity to the
    thesis, not for speed.
    """

    opts: LGATT

    def _reset_collection(self) -> None:
        super()._reset_collection()
        self.trace: list[Snapshot] = []
        self.final_grads: dict[int, Tensor] | None = None  # λ_F per parameter index (non-extra rules)

    def _method_memory(self, snap_bytes: int) -> dict[str, int]:
        return {"trace": self.opts.horizon * snap_bytes}

    def _final_step(self) -> int:
        return self.opts.horizon if self.opts.extra else self.opts.horizon - 1

    def _step(self, t: int, closure: Closure, evaluate: Evaluate, collect: bool) -> Tensor:
        self._load_theta(self._theta(t))
        if collect and t < self._final_step():
            self.trace.append(self._capture(with_rng=True))
        loss = evaluate(closure)
        lam, _ = self.surrogate_grads()
        for i, g in lam.items():
            self.managed[i].param.grad = g
        if collect and t == self._final_step():  # non-extra rules: λ_F is this step's gradient
            self.final_grads = {
                j: p.grad.detach().clone() for j, p in enumerate(self._params()) if p.grad is not None
            }
        self.optimizer.step()
        return loss

    def _collect_end(self, evaluate: Evaluate) -> None:
        lam_f = self._extra_loss(evaluate) if self.opts.extra else self.final_grads
        live = self._capture(with_rng=True)
        trace = Trace(
            self.trace,
            self.closures,
            self.hparams,
            self._group_index(),
            type(self.optimizer),
            self._params(),
            self.buffers,
            self.managed,
            self.slices,
            self._theta,
        )
        if self.opts.hessian == "exact":
            sweep = reverse_sweep(trace, lam_f)
        else:
            seed, horizons, replay = self.opts.seed, self.horizons, self.replay
            sweep = diagonal_sweep(
                trace, lam_f, lambda p, t, i: rademacher_probe(p, seed, horizons, replay, t, i)
            )
        for t, hs in sweep:
            self._add_h(t, hs)
        self._restore(live, state=False)
        self.trace, self.final_grads = [], None

    def _add_h(self, t: int, hs: dict[int, Tensor | None]) -> None:
        """hbuf[row(t)] += h_t; ``hs`` maps a surrogate-tensor index to its gradient."""
        if not self._learned(t):
            return
        row = self._row(t)
        for k, h in hs.items():
            if h is not None:
                self.hbuf[k][row] += h

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["trace"] = [x.state_dict() for x in self.trace]
        sd["final_grads"] = self.final_grads
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.trace = [Snapshot.from_state_dict(x) for x in sd["trace"]]
        self.final_grads = None if sd["final_grads"] is None else dict(sd["final_grads"])
