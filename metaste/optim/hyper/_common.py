"""The runtime every HyperSTE method shares (docs/design.md §3): the managed weights (with their
FSDP2 view: the rank's rows of g, u and θ, docs/design.md §10.4), the runtime interface
:class:`HyperMethod` with its step protocol, the λ = g ⊙ ψ loop, the pending record of an update
whose hypergradient waits for the next gradient, the hyper-descent step and the diagnostics'
statistics.

A method is two objects: its *options* (a frozen dataclass that validates itself, e.g.
:class:`~metaste.optim.hyper.delayed.Delayed`, built on :class:`~._options.MethodOptions`; what
the user passes as ``HyperSTE(method=...)``) and its *runtime* (a :class:`HyperMethod` subclass the
options build once the managed weights are known; it holds the state and answers ``step``,
``diagnostics`` and ``state_dict``). The surrogate learning rate is :class:`~._hyper_lr.HyperLR`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..._compile import FUSE_MIN, compilable, kernel
from ...quant.learnable import SLSTE
from ...quant.psi import slste, slste_grad_code
from ...quant.registry import QuantEntry
from ..core.closure import Closure
from ..core.fsdp import all_reduce_sums, as_dtensor_like, is_dtensor, local, local_scale, shard_group
from ._hyper_lr import HyperLR
from .diffopt import UpdateRecord, one_step_hypergradient, record_update

if TYPE_CHECKING:
    from ._options import MethodOptions

__all__ = ["HyperMethod", "ManagedWeight", "PendingStep", "surrogate_stats"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_BINS = 20
Evaluate = Callable[[Closure], Tensor]


@dataclass(frozen=True, eq=False)
class ManagedWeight(QuantEntry):
    """A quantized weight whose learnable surrogate HyperSTE trains: its registry entry
    (``qn``, ``qp``, ``surrogate``, ``u()`` — u = v/s now, detached: in ``step`` the u of the
    forward that made the grad) plus a name for the diagnostics.

    Under FSDP2 (docs/design.md §10.4) the weight is a DTensor sharded by rows and the method
    works on the rank's rows: ``u()``, :meth:`local_grad` and :meth:`theta` are those rows (θ is
    sharded like the weight when it has an entry per row, :func:`~metaste.optim.core.fsdp.shard_rows_like`;
    a per-tensor θ is whole on every rank), :meth:`set_grad` hands the rows back as a DTensor and
    :attr:`group` is the mesh to sum over (``None`` on one process: every method is unchanged)."""

    name: str = ""

    @property
    def param(self) -> nn.Parameter:
        return self.weight

    @property
    def group(self) -> Any:
        """The process group the weight's rows are sharded over (FSDP2), else ``None``."""
        return shard_group(self.weight)

    def u(self) -> Tensor:
        if not is_dtensor(self.weight):
            return super().u()
        w = self.weight.detach()
        return local(w) / local_scale(self.quantizer.scale(w), w)

    def local_grad(self) -> Tensor | None:
        """The gradient of the weight (the rank's rows under FSDP2), or ``None``."""
        g = self.weight.grad
        return None if g is None else local(g)

    def set_grad(self, g: Tensor) -> None:
        """Set the weight's gradient to ``g`` (the rank's rows under FSDP2)."""
        self.weight.grad = as_dtensor_like(g, self.weight) if is_dtensor(self.weight) else g

    def theta(self) -> tuple[Tensor, ...]:
        """The surrogate parameters (the rank's rows where they are sharded; in-place changes
        reach the buffers)."""
        return tuple(local(t) for t in self.surrogate.params())

    def sum_over_shards(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` (partial sums over the rank's rows) summed over the weight's shards."""
        group = self.group
        return values if group is None else all_reduce_sums(values, group, device)


def _slste_lambda(
    u: Tensor, a: Tensor, g: Tensor, qn: float, qp: float, boundary: str, b: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(SLSTE's region code of u, λ = ψ(code; a)·g, the count of ψ ≠ 0) for ``torch.compile``:
    the operations of :meth:`HyperMethod.surrogate_grads`'s eager path (the same values; a·u
    out of place, which equals the eager path's u·a in u's buffer)."""
    code = slste_grad_code(u, a, qn, qp, boundary, b)
    psi = slste(code, a, qn, qp)
    nnz = psi.count_nonzero()
    return code, psi.mul_(g), nnz


@dataclass
class PendingStep:
    """A recorded update v_t → v_{t+1} whose one-step hypergradient waits for λ_{t+1}: the
    update's inputs (no graph), the raw gradients g_t and u_t of the managed weights ``idx``, and
    (horizon methods) θ_t per surrogate tensor and t. ``None`` θ: the surrogates' current values.
    A u_t may be its one-byte SLSTE code (uint8, ``record_pending(compact=True)``); a checkpoint
    holds either form, and one with the full u_t (before the code) loads as it is."""

    record: UpdateRecord
    grads: list[Tensor]
    us: list[Tensor]
    idx: list[int]
    theta: list[Tensor] | None = None
    t: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "record": self.record.state_dict(),
            "grads": self.grads,
            "u": self.us,
            "idx": self.idx,
            "theta": self.theta,
            "t": self.t,
        }

    @classmethod
    def from_state_dict(cls, optimizer_cls: type[Optimizer], sd: dict[str, Any]) -> PendingStep:
        theta = sd.get("theta")
        return cls(
            UpdateRecord.from_state_dict(optimizer_cls, sd["record"]),
            list(sd["grads"]),
            list(sd["u"]),
            list(sd["idx"]),
            None if theta is None else list(theta),
            sd.get("t"),
        )


class HyperMethod:
    """The runtime of a HyperSTE method. ``HyperSTE.step`` calls :meth:`step`, whose default is
    the per-step protocol: closure + backward (managed weights get the raw ∂L/∂v̂),
    :meth:`before_update` (must turn each managed ``p.grad`` into the surrogate gradient), the
    base ``optimizer.step()``, then :meth:`after_update`. The horizon methods override
    :meth:`step` (replays run inside it)."""

    name: ClassVar[str]
    #: whether the method writes θ only after the base optimizer's step (in :meth:`after_update`),
    #: so that a step that raises before it leaves θ unchanged without the step guard's copy
    writes_theta_last: ClassVar[bool] = False

    def __init__(
        self, optimizer: Optimizer, managed: list[ManagedWeight], opts: MethodOptions, model: nn.Module | None
    ) -> None:
        self.optimizer, self.managed, self.opts, self.model = optimizer, managed, opts, model
        self.name = opts.name
        self.tensors = [t for mw in managed for t in mw.theta()]  # the rank's rows under FSDP2
        self.slices = _slices(managed)  # managed weight i owns self.tensors[self.slices[i]]
        # FSDP2 (docs/design.md §10.4), per surrogate tensor: the group a sharded θ's entries are
        # summed over, and the group a whole θ's hypergradient (a sum over the weight's
        # elements, of which the rank holds its rows) is all-reduced over
        self.theta_groups = [
            mw.group if is_dtensor(t) else None for mw in managed for t in mw.surrogate.params()
        ]
        self.h_groups = [None if is_dtensor(t) else mw.group for mw in managed for t in mw.surrogate.params()]
        self.hyper_lr = HyperLR(
            opts.hyper_lr, opts.hyper_lr_mode, opts.normalize_beta, len(self.tensors), self.theta_groups
        )
        # per-step scalars for the diagnostics, filled by the method: {layer name: {key: value}}
        self.step_stats: dict[str, dict[str, float]] = {}
        self.hypergrad_norm = 0.0

    # -- the step protocol ------------------------------------------------------------------

    def step(self, closure: Closure | None, evaluate: Evaluate, t: int) -> Tensor:
        """Step ``t``; returns the closure's loss (detached)."""
        loss = evaluate(closure)
        self.before_update(t)
        self.optimizer.step()
        self.after_update(t)
        return loss

    def before_update(self, step: int) -> None:
        raise NotImplementedError

    def after_update(self, step: int) -> None:
        """Hook after the base optimizer's step (default: nothing)."""

    # -- shared pieces ----------------------------------------------------------------------

    def surrogate_grads(
        self, compact: bool = False
    ) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """λ = g ⊙ ψ(u; θ) per managed weight index (θ = the surrogate buffers now) and its
        (g, u); records each layer's ``clipped_frac`` (ψ = 0) for the diagnostics. ``compact``: u
        is the surrogate's one-byte code where it has one (SLSTE; the same ψ bit for bit, formed
        in u's buffer), valid while θ stays as it is."""
        lam, raw = {}, {}
        self.step_stats = {}
        for i, mw in enumerate(self.managed):
            g = mw.local_grad()
            if g is None:  # weight not used by this loss: the base optimizer skips it too
                continue
            u = mw.u()  # a fresh tensor
            theta = mw.theta()
            s = mw.surrogate
            if (
                compact
                and isinstance(s, SLSTE)
                and u.numel() >= FUSE_MIN
                and u.dtype == theta[0].dtype
                and compilable(u, g, theta[0])
            ):  # the code, ψ, its count and λ in one compiled pass
                code, lam_i, nnz = kernel(_slste_lambda, "hyper", True)(
                    u, theta[0], g, mw.qn, mw.qp, s.boundary, s.b
                )
                n, nnz = mw.sum_over_shards([g.numel(), float(nnz)], g.device)
                self.step_stats[mw.name] = {"clipped_frac": (n - nnz) / n}
                lam[i], raw[i] = lam_i, (g, code)
                continue
            code = s.code(u, mw.qn, mw.qp, theta, inplace=True) if compact else None
            if code is not None:
                u = code
            del code
            psi = s.psi(u, mw.qn, mw.qp, theta)
            n, nnz = mw.sum_over_shards([g.numel(), float(psi.count_nonzero())], g.device)
            self.step_stats[mw.name] = {"clipped_frac": (n - nnz) / n}
            lam[i], raw[i] = psi.mul_(g), (g, u)  # g ⊙ ψ in ψ's buffer
        return lam, raw

    def record_pending(
        self,
        raw: dict[int, tuple[Tensor, Tensor]],
        theta: list[Tensor] | None = None,
        t: int | None = None,
        *,
        compact: bool = False,
    ) -> PendingStep:
        """A :class:`PendingStep` of the coming base update; call it right before ``optimizer.step()``.
        ``compact``: u_t kept as the surrogate's one-byte code where it has one (SLSTE,
        ``LearnableSurrogate.code`` with the current θ, which must be the θ the hypergradient
        uses: θ frozen until then)."""
        idx = sorted(raw)
        record = record_update(self.optimizer, [self.managed[i].param for i in idx], light=True)
        record.params = [local(p) for p in record.params]  # FSDP2: the rank's rows
        record.states = [_local_state(st) for st in record.states]
        us = []
        for i in idx:
            mw, u = self.managed[i], raw[i][1]
            code = mw.surrogate.code(u, mw.qn, mw.qp, mw.theta()) if compact and theta is None else None
            us.append(u if code is None else code)
        return PendingStep(record, [raw[i][0] for i in idx], us, idx, theta, t)

    def pending_hypergradient(
        self, pending: PendingStep, lam: dict[int, Tensor]
    ) -> Iterator[tuple[int, Tensor]]:
        """(surrogate tensor index k, h_k) of ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩ for the pending step
        (:func:`~metaste.optim.hyper.diffopt.one_step_hypergradient`); weights without λ_{t+1} give none."""
        if not pending.idx or all(lam.get(i) is None for i in pending.idx):
            return  # no managed weight got a gradient at t or t+1 (a loss that missed them)
        entries = [self.managed[i] for i in pending.idx]
        if pending.theta is None:
            thetas = [list(mw.theta()) for mw in entries]
        else:
            thetas = [pending.theta[self.slices[i]] for i in pending.idx]
        lams = [lam.get(i) for i in pending.idx]
        # the pending record is used once (its owner drops it): updated in place, not cloned
        live = [_local_state(self.optimizer.state.get(mw.param, {})) for mw in entries]  # after step t
        hs = one_step_hypergradient(
            pending.record, entries, pending.grads, pending.us, thetas, lams, consume=True, live_states=live
        )
        for i, hi in zip(pending.idx, hs):
            for k, h in zip(range(self.slices[i].start, self.slices[i].stop), hi):
                if h is not None:
                    if self.h_groups[k] is not None:  # FSDP2: the rank's rows' part of a whole θ's h
                        dist.all_reduce(h, group=self.h_groups[k])
                    yield k, h

    def apply_hypergradient(self, params: list[Tensor], h: list[Tensor], hyper_opt: Optimizer | None) -> bool:
        """θ ← θ − η_a·h (η_a per tensor, :class:`HyperLR`) on ``params``, by ``hyper_opt`` if given
        (its lr is ``hyper_lr``; normalisation rescales the gradient it sees). Records the norm;
        a non-finite h changes nothing and returns False. Clamping is the caller's. A sharded
        θ (FSDP2): ``params`` and ``h`` are the rank's rows; the norm and the test sum over the mesh."""
        sq = [float(x.to(torch.float64, copy=True).pow_(2).sum()) for x in h]  # one copy at a time
        # a non-finite entry makes its sum of squares non-finite, and finite float32 squares cannot
        # overflow a float64 sum: the test needs no pass of its own (a float64 entry
        # beyond ~1e154 counts as non-finite, and its window is skipped)
        bad = [float(not math.isfinite(x)) for x in sq]
        for k, group in enumerate(self.theta_groups):
            if group is not None:
                sq[k], bad[k] = all_reduce_sums([sq[k], bad[k]], group, h[k].device)
        self.hypergrad_norm = float(sum(sq)) ** 0.5
        if any(bad):
            return False
        with torch.no_grad():
            etas = [self.hyper_lr(k, x) for k, x in enumerate(h)]
            if hyper_opt is None:
                for p, x, eta in zip(params, h, etas):
                    p.sub_(eta * x)
                return True
            for p, x, eta in zip(params, h, etas):
                p.grad = x * (eta / self.opts.hyper_lr if self.opts.hyper_lr > 0 else 0.0)
            hyper_opt.step()
            for p in params:
                p.grad = None
        return True

    # -- diagnostics and state --------------------------------------------------------------

    def diagnostics(self) -> dict[str, Any]:
        """The method's own entries of ``HyperSTE.diagnostics`` (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"hyper_lr": self.hyper_lr.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.hyper_lr.load_state_dict(sd["hyper_lr"])


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state with its DTensors replaced by the rank's shards (FSDP2)."""
    return {k: local(v) if isinstance(v, Tensor) else v for k, v in state.items()}


def _slices(managed: list[ManagedWeight]) -> list[slice]:
    out, k = [], 0
    for mw in managed:
        n = len(mw.surrogate.param_names)
        out.append(slice(k, k + n))
        k += n
    return out


def surrogate_stats(t: Tensor, a_min: float, a_max: float) -> dict[str, Any]:
    """mean / min / max / quantiles / histogram over [a_min, a_max] / fraction at each clamp."""
    flat = t.detach().flatten().double()
    srt = flat.sort().values
    n = srt.numel()
    stats: dict[str, Any] = {
        "mean": float(flat.mean()),
        "min": float(srt[0]),
        "max": float(srt[-1]),
        "frac_at_min": float((flat <= a_min).double().mean()),
        "frac_at_max": float((flat >= a_max).double().mean()),
    }
    for q in QUANTILES:
        stats[f"q{round(q * 100):02d}"] = float(srt[min(n - 1, round(q * (n - 1)))])
    counts = torch.histc(flat, bins=HIST_BINS, min=a_min, max=a_max)
    stats["hist"] = {"counts": counts.long().tolist(), "range": (a_min, a_max)}
    return stats
