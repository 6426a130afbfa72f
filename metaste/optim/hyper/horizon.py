"""Horizon methods of HyperSTE (SPEC §3.3–3.4): ``fagu`` (All Times Together, thesis 4.4 = FAGU
5.3), ``pfagu`` (its relaxed per-epoch form, thesis 4.4 "Relaxed ATT" = P-FAGU 5.4) and ``lgatt``
(Less-Greedy ATT, thesis 4.5 = FLAGU 5.3).

A *horizon* is T steps over a fixed, recorded sequence of batches. The surrogate parameters θ
follow a *schedule* (one set per step, ``"per_step"``, or one per horizon, ``"shared"``) that is
learned by replaying the horizon K times from a snapshot S and then running it once more with the
learned schedule (the *final pass*)::

    S = snapshot(parameters incl. LSQ scales and BN affine, buffers, optimizer state, RNG)
    θ^0 = previous horizon's θ^K (warm_start) or the initial values
    for r in 0..K−1:                            # replay 0 is the user's own pass
        restore S; run the T steps with θ^r     # step t uses θ^r_t in its backward: g_t ⊙ ψ(u_t; θ_t)
        h = hypergradient of the replay         # fagu: h_t = ∂L_{t+1}/∂θ_t (greedy, thesis 4.13)
                                                # lgatt: h_t = ∂L_F/∂θ_t (final loss, thesis 4.15–4.22)
        θ^{r+1} = clamp(θ^r − η_a·h)            # thesis 4.12 (or the hyper-optimizer)
    restore S; run the T steps with θ^K; keep the result          (final_pass=True)

The base optimizer's update as a function of θ (and of v_t and its state, for lgatt) comes from
:mod:`metaste.optim.diffopt`; nothing here re-derives an optimizer.

The step-driven API (SPEC §3.3 decision): the user's ``opt.step(closure)`` loop is unchanged. The
user's pass over a horizon is replay 0: each ``step`` runs with θ^0, returns that step's loss and
records the closure (a closure must be re-callable: it captures its batch, it does not pull a new
one). The horizon's last ``step`` runs replays 1..K−1 and the final pass itself and returns with
the weights at the end of the final pass: the cost is (K+1)× plain training plus the
hypergradients. :meth:`Horizon.run_horizon` does the same for a list of closures. Afterwards the
global RNG continues from its state at the end of the user's pass, so K does not change the
user's random stream.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...quant.surrogates import psi_differentiable
from .._wrapper import Closure, NonFiniteLossError, check_closure
from ..diffopt import UpdateRecord, differentiable_step, differentiable_update, record_update
from ._common import HyperMethod, HyperOptions, ManagedWeight

__all__ = [
    "HORIZON_METHODS",
    "LAST_RULES",
    "HorizonOptions",
    "HorizonMemoryError",
    "horizon_options",
    "Horizon",
    "FAGU",
    "PFAGU",
    "LGATT",
]

HORIZON_METHODS = ("fagu", "pfagu", "lgatt")
LAST_RULES = ("carry", "ste", "extra_carry", "extra_ste")
SCHEDULES = ("per_step", "shared")
HESSIANS = ("exact", "diag")
# thesis defaults: FAGU / FLAGU Tables 5.2/5.3 ran K = 50 a-updates, P-FAGU (5.4) K = 5 per epoch
DEFAULT_REPLAYS = {"fagu": 50, "pfagu": 5, "lgatt": 50}
# ATT is per step (thesis 4.4); P-FAGU learns "the optimal LSTE parameter for it [the epoch]"
DEFAULT_SCHEDULE = {"fagu": "per_step", "pfagu": "shared", "lgatt": "per_step"}

Evaluate = Callable[[Closure], Tensor]


class HorizonMemoryError(MemoryError):
    """A horizon's up-front memory estimate exceeds ``memory_budget``; nothing was changed."""


@dataclass(frozen=True)
class HorizonOptions:
    """The validated horizon keyword arguments of :class:`~metaste.optim.hyperste.HyperSTE`."""

    horizon: int
    replays: int
    schedule: str
    last: str
    warm_start: bool
    final_pass: bool
    memory_budget: float
    hessian: str
    recalibrate: Callable[[nn.Module], Any] | None
    seed: int

    @property
    def extra(self) -> bool:
        """Whether L_T is evaluated on one extra batch after the horizon's last step."""
        return self.last.startswith("extra")


def _default_budget() -> float:
    """Half of the machine's physical memory (bytes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no default limit
        return math.inf


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def horizon_options(
    method: str,
    optimizer: Optimizer,
    model: nn.Module | None,
    boundary: str | None,
    *,
    horizon: int | None = None,
    horizon_epochs: int | None = None,
    steps_per_epoch: int | Sized | None = None,
    replays: int | None = None,
    schedule: str | None = None,
    last: str | None = None,
    warm_start: bool | None = None,
    final_pass: bool | None = None,
    memory_budget: float | None = None,
    hessian: str | None = None,
    recalibrate: Callable[[nn.Module], Any] | None = None,
    seed: int | None = None,
) -> HorizonOptions | None:
    """Validate the horizon arguments of ``HyperSTE`` and fill in the defaults (SPEC §3.3–3.4).

    Returns ``None`` for a per-step method (which must not receive any of them). Raises a
    ``ValueError``/``TypeError`` naming the bad value before anything is changed.
    """
    given = {
        k: v
        for k, v in dict(
            horizon=horizon,
            horizon_epochs=horizon_epochs,
            steps_per_epoch=steps_per_epoch,
            replays=replays,
            schedule=schedule,
            last=last,
            warm_start=warm_start,
            final_pass=final_pass,
            memory_budget=memory_budget,
            hessian=hessian,
            recalibrate=recalibrate,
            seed=seed,
        ).items()
        if v is not None
    }
    if method not in HORIZON_METHODS:
        if given:
            raise ValueError(
                f"{sorted(given)} apply to the horizon methods {HORIZON_METHODS} only, not to method={method!r}"
            )
        return None
    if model is None:
        raise ValueError(
            f"method={method!r} needs model=: its buffers (e.g. BN running statistics) are part of the "
            "snapshot every replay starts from"
        )
    if (horizon is None) == (horizon_epochs is None):
        raise ValueError(
            f"method={method!r} needs exactly one of horizon=T (steps) or horizon_epochs=E with "
            f"steps_per_epoch=len(loader); got horizon={horizon!r}, horizon_epochs={horizon_epochs!r}"
        )
    if horizon_epochs is not None:
        if not _is_int(horizon_epochs) or horizon_epochs < 1:
            raise ValueError(f"Invalid horizon_epochs: {horizon_epochs!r}; it must be an int >= 1")
        spe = len(steps_per_epoch) if isinstance(steps_per_epoch, Sized) else steps_per_epoch
        if not _is_int(spe) or spe < 1:
            raise ValueError(
                f"Invalid steps_per_epoch: {steps_per_epoch!r}; horizon_epochs needs an int >= 1 or a "
                "data loader (its len() is used)"
            )
        horizon = horizon_epochs * spe
    elif steps_per_epoch is not None:
        raise ValueError("steps_per_epoch applies to horizon_epochs=..., not to horizon=T (steps)")
    if not _is_int(horizon) or horizon < 1:
        raise ValueError(f"Invalid horizon: {horizon!r}; it must be an int >= 1 (steps)")
    replays = DEFAULT_REPLAYS[method] if replays is None else replays
    if not _is_int(replays) or replays < 1:
        raise ValueError(f"Invalid replays: {replays!r}; K must be an int >= 1 (replay 0 is the user's pass)")
    schedule = DEFAULT_SCHEDULE[method] if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid schedule: {schedule!r}; choose one of {SCHEDULES}")
    last = ("carry" if horizon >= 2 else "extra_ste") if last is None else last
    if last not in LAST_RULES:
        raise ValueError(f"Invalid last: {last!r}; choose one of {LAST_RULES}")
    if horizon == 1 and last in ("carry", "ste"):
        raise ValueError(
            f"last={last!r} with horizon=1 leaves nothing to learn (θ_0 is tied/baseline and L_1 lies "
            "outside the horizon); use 'extra_ste' or 'extra_carry'"
        )
    for name, flag in (("warm_start", warm_start), ("final_pass", final_pass)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    budget = _default_budget() if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"Invalid memory_budget: {memory_budget!r}; give bytes > 0 (math.inf: no limit)")
    if hessian is not None and method != "lgatt":
        raise ValueError(f"hessian= applies to method='lgatt' only, not to method={method!r}")
    hessian = "exact" if hessian is None else hessian
    if hessian not in HESSIANS:
        raise ValueError(f"Invalid hessian: {hessian!r}; choose one of {HESSIANS}")
    if method == "lgatt" and boundary == "window":
        raise ValueError(
            "method='lgatt' differentiates ψ by autograd when it recomputes a step, which gives "
            "SLSTE's boundary='none' derivative; boundary='window' is not available for it"
        )
    if method == "lgatt" and hessian == "diag":
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
    if recalibrate is not None and not callable(recalibrate):
        raise TypeError(
            f"recalibrate must be callable as recalibrate(model), got {type(recalibrate).__name__}"
        )
    seed = 0 if seed is None else seed
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return HorizonOptions(
        horizon,
        replays,
        schedule,
        last,
        True if warm_start is None else warm_start,
        True if final_pass is None else final_pass,
        float(budget),
        hessian,
        recalibrate,
        seed,
    )


# ---------------------------------------------------------------------------------------------
# Snapshots: parameters, optimizer state, buffers, RNG
# ---------------------------------------------------------------------------------------------


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else v


class _Rng:
    """The torch (CPU and CUDA), Python ``random`` and NumPy global RNG states."""

    def __init__(self, devices: Sequence[torch.device] = ()) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = {d.index: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)
        random.setstate(self.python)
        np.random.set_state(self.numpy)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> _Rng:
        rng = cls.__new__(cls)
        rng.__dict__.update(sd)
        return rng


@dataclass
class _Snap:
    """Values of the parameters, their optimizer state and the model buffers at one moment.

    ``params``/``states`` are aligned with :meth:`Horizon._params`, ``buffers`` with
    ``Horizon.buffers``; ``rng`` is taken before the step's closure (``None`` if not needed)."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    buffers: list[Tensor]
    rng: _Rng | None

    def nbytes(self) -> int:
        ts = (
            self.params + self.buffers + [v for s in self.states for v in s.values() if isinstance(v, Tensor)]
        )
        return sum(t.numel() * t.element_size() for t in ts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "states": self.states,
            "buffers": self.buffers,
            "rng": None if self.rng is None else self.rng.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> _Snap:
        rng = None if sd["rng"] is None else _Rng.from_state_dict(sd["rng"])
        return cls(list(sd["params"]), list(sd["states"]), list(sd["buffers"]), rng)


def _captured_bytes(fn: Any, exclude: set[int], depth: int = 0) -> int:
    """Bytes of the tensors a closure captures (cells, defaults, ``functools.partial`` arguments;
    tuples / lists / dicts of them), excluding storages in ``exclude`` (the model's own tensors) —
    an estimate of what recording the closure keeps alive. Modules are not entered."""
    if depth > 4:
        return 0
    if isinstance(fn, Tensor):
        ptr = fn.untyped_storage().data_ptr()
        if ptr in exclude:
            return 0
        exclude.add(ptr)
        return fn.untyped_storage().nbytes()
    if isinstance(fn, (tuple, list)):
        return sum(_captured_bytes(x, exclude, depth + 1) for x in fn)
    if isinstance(fn, dict):
        return sum(_captured_bytes(x, exclude, depth + 1) for x in fn.values())
    if isinstance(fn, nn.Module):
        return 0
    parts: list[Any] = []
    if callable(fn):
        parts += [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _cell_filled(c)]
        parts += list(getattr(fn, "__defaults__", None) or ())
        parts += list((getattr(fn, "__kwdefaults__", None) or {}).values())
        parts += list(getattr(fn, "args", ()) or ()) + list((getattr(fn, "keywords", None) or {}).values())
    return sum(_captured_bytes(x, exclude, depth + 1) for x in parts)


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


@contextmanager
def _surrogates_as(managed: list[ManagedWeight], values: list[list[Tensor]]):
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


def _rademacher(like: Tensor, seed: int, *keys: int) -> Tensor:
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    z = torch.randint(0, 2, like.shape, generator=g).to(like.dtype).mul_(2).sub_(1)
    return z.to(like.device)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class Horizon(HyperMethod):
    """Replays, schedules, snapshots and the step-driven protocol shared by fagu / pfagu / lgatt.

    Subclasses say how a replay's hypergradient is collected (:class:`FAGU`: one-step, during the
    replay; :class:`LGATT`: a reverse sweep after it). ``HyperSTE`` calls :meth:`step` instead of
    the per-step hooks of :class:`HyperMethod`.

    Schedule layout: per surrogate tensor θ_k a tensor of shape ``[S, *θ_k.shape]`` with S = T
    (``per_step``) or 1 (``shared``). Step t uses row ``t`` (``0`` if shared), except the last step
    under ``last="carry"`` (row T−2: tied to the previous step) or ``last="ste"`` (the baseline
    a = 1, not learned). With ``"extra_carry"``/``"extra_ste"`` the loss L_T is evaluated after the
    last step on one extra batch (the horizon's first batch in the step-driven API; ``extra=`` of
    :meth:`run_horizon`) with θ_{T−1} / the baseline in its backward, so θ_{T−1} is learned too.
    """

    default_boundary = "none"

    def __init__(
        self,
        optimizer: Optimizer,
        managed: list[ManagedWeight],
        opts: HyperOptions,
        hopts: HorizonOptions,
        model: nn.Module,
    ) -> None:
        super().__init__(optimizer, managed, opts)
        self.hopts, self.model = hopts, model
        theta_ids = {id(t) for t in self.tensors}
        self.buffers = [b for _, b in model.named_buffers() if id(b) not in theta_ids]
        rows = hopts.horizon if hopts.schedule == "per_step" else 1
        self.initial = [t.detach().clone() for t in self.tensors]
        self.schedule = [t.detach().unsqueeze(0).repeat((rows,) + (1,) * t.dim()) for t in self.tensors]
        self.hyper_opt = (
            opts.hyper_optimizer(self.schedule, lr=opts.hyper_lr, **opts.hyper_optimizer_kwargs)
            if opts.hyper_optimizer is not None
            else None
        )
        self.slices = self._slices()
        self.pos = 0  # steps of the user's pass done in the current horizon
        self.horizons = 0  # completed horizons
        self.replay = 0  # index of the pass being collected (0 = the user's)
        self.closures: list[Closure] = []
        self.extra_closure: Closure | None = None
        self.snap: _Snap | None = None
        self.hparams: list[list[dict[str, Any]]] = []  # per step: each group's hyperparameters
        self.hbuf = [torch.zeros_like(s) for s in self.schedule]
        self.hypergrad = [torch.zeros_like(s) for s in self.schedule]  # of the last replay
        self.losses: list[list[float]] = []  # per collected replay of the current/last horizon
        self.final_losses: list[float] = []
        self.skipped = 0  # replays whose hypergradient was not finite (θ unchanged)
        self.nonfinite = 0  # replays stopped by a non-finite loss (θ rolled back)
        self.memory_estimate: dict[str, int] = {}

    # -- bookkeeping --------------------------------------------------------------------------

    def _slices(self) -> list[slice]:
        out, k = [], 0
        for mw in self.managed:
            n = len(mw.surrogate.param_names)
            out.append(slice(k, k + n))
            k += n
        return out

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _group_index(self) -> list[int]:
        return [i for i, g in enumerate(self.optimizer.param_groups) for _ in g["params"]]

    def _row(self, t: int) -> int:
        """The schedule row step t reads (and its hypergradient goes to)."""
        if self.hopts.schedule == "shared":
            return 0
        return self.hopts.horizon - 2 if t == self.hopts.horizon - 1 and self.hopts.last == "carry" else t

    def _theta(self, t: int) -> list[Tensor]:
        """θ_t, one tensor per surrogate tensor (the baseline a = 1 for the last step under "ste")."""
        if t == self.hopts.horizon - 1 and self.hopts.last == "ste":
            return [torch.ones_like(x) for x in self.tensors]
        r = self._row(t)
        return [s[r] for s in self.schedule]

    def _learned(self, t: int) -> bool:
        """Whether θ_t is a learned schedule entry (not the baseline)."""
        return not (t == self.hopts.horizon - 1 and self.hopts.last == "ste")

    @torch.no_grad()
    def _set_schedule(self, values: list[Tensor]) -> None:
        for s, x in zip(self.schedule, values):
            s.copy_(x)  # in place: the hyper-optimizer holds these tensors

    @torch.no_grad()
    def _load_theta(self, values: list[Tensor]) -> None:
        for t, v in zip(self.tensors, values):
            t.copy_(v)

    def _capture(self, with_rng: bool) -> _Snap:
        params = self._params()
        states = [{k: _clone(v) for k, v in self.optimizer.state.get(p, {}).items()} for p in params]
        rng = _Rng({p.device for p in params}) if with_rng else None
        return _Snap(
            [p.detach().clone() for p in params], states, [b.detach().clone() for b in self.buffers], rng
        )

    @torch.no_grad()
    def _restore(self, snap: _Snap, *, state: bool = True) -> None:
        for p, x in zip(self._params(), snap.params):
            p.copy_(x)
        for b, x in zip(self.buffers, snap.buffers):
            b.copy_(x)
        if state:
            for p, st in zip(self._params(), snap.states):
                if st:
                    self.optimizer.state[p] = {k: _clone(v) for k, v in st.items()}
                else:
                    self.optimizer.state.pop(p, None)
        if snap.rng is not None:
            snap.rng.restore()

    def _group_hparams(self) -> list[dict[str, Any]]:
        return [{k: _clone(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def _set_hparams(self, hps: list[dict[str, Any]]) -> None:
        for g, hp in zip(self.optimizer.param_groups, hps):
            g.update({k: _clone(v) for k, v in hp.items()})

    def _surrogate_grads(self) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """λ = g ⊙ ψ(u; θ) per managed weight (θ = the surrogate buffers now), and (g, u)."""
        lam, raw = {}, {}
        self.step_stats = {}
        for i, mw in enumerate(self.managed):
            g = mw.param.grad
            if g is None:  # weight not used by this loss: the base optimizer skips it too
                continue
            u = mw.u()
            psi = mw.surrogate.psi(u, mw.qn, mw.qp)
            lam[i], raw[i] = g * psi, (g, u)
            self.step_stats[mw.name] = {"clipped_frac": float((psi == 0).sum()) / g.numel()}
        return lam, raw

    # -- memory ------------------------------------------------------------------------------

    def estimate_memory(self, closures: Sequence[Closure]) -> dict[str, int]:
        """Up-front estimate (bytes) of what one horizon keeps alive (SPEC §3.3): recorded batches
        (tensors captured by the closures, the first one's times T if only it is known), the
        schedule and its hypergradient, the snapshot S and the method's per-step storage. The
        optimizer state is counted as it is now (before the first step of a run, Adam's moments
        do not exist yet and are not counted)."""
        T = self.hopts.horizon
        own = {
            t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())
        }
        batches = sum(_captured_bytes(c, own) for c in closures)
        if len(closures) < T:
            batches = batches * T // max(1, len(closures))
        sched = 2 * sum(s.numel() * s.element_size() for s in self.schedule)
        snap = self._capture(with_rng=False).nbytes()
        out = {"batches": batches, "schedule": sched, "snapshot": snap}
        out.update(self._method_memory(snap))
        out["total"] = sum(out.values())
        return out

    def _method_memory(self, snap_bytes: int) -> dict[str, int]:
        """The method's own storage per horizon (bytes, by name), given the snapshot's size."""
        raise NotImplementedError

    def _check_memory(self, closures: Sequence[Closure]) -> None:
        est = self.estimate_memory(closures)
        self.memory_estimate = est
        budget = self.hopts.memory_budget
        if est["total"] > budget:
            mib = 2.0**20
            parts = ", ".join(f"{k} {v / mib:.1f} MiB" for k, v in est.items() if k != "total")
            raise HorizonMemoryError(
                f"HyperSTE(method={self.name!r}): a horizon of T={self.hopts.horizon} steps needs about "
                f"{est['total'] / mib:.1f} MiB ({parts}), above memory_budget={budget / mib:.1f} MiB. "
                "Use a shorter horizon, schedule='shared', smaller batches, or raise memory_budget"
            )

    # -- the step-driven protocol --------------------------------------------------------------

    def step(self, closure: Closure, evaluate: Evaluate, extra: Closure | None = None) -> Tensor:
        """One step of the user's pass (replay 0); the horizon's last step also runs replays
        1..K−1 and the final pass. Returns this step's loss with θ^0."""
        if self.pos > 0 and len(self.closures) != self.pos:
            raise RuntimeError(
                f"this HyperSTE was loaded from a state_dict saved after step {self.pos} of a horizon; "
                f"give it that horizon's first {self.pos} closures with opt.resume_horizon(closures) "
                "before the next step (closures cannot be saved in a state_dict)"
            )
        check_closure(closure, "HyperSTE")
        if self.pos == 0:
            self._check_memory([closure])
        return self._user_step(closure, evaluate, extra)

    def _user_step(self, closure: Closure, evaluate: Evaluate, extra: Closure | None) -> Tensor:
        if self.pos == 0:
            self._begin()
        if extra is not None:
            self.extra_closure = extra
        self.hparams.append(self._group_hparams())
        loss = self._step(self.pos, closure, evaluate, collect=True)
        self.closures.append(closure)
        self.losses[0].append(float(loss))
        self.pos += 1
        if self.pos == self.hopts.horizon:
            self._finish(evaluate)
        return loss

    def run_horizon(
        self, closures: Sequence[Closure], evaluate: Evaluate, extra: Closure | None = None
    ) -> list[Tensor]:
        """Run one whole horizon over ``closures`` (T re-callable closures); returns the user-pass
        losses (θ^0). ``extra``: the batch of L_T for the ``extra_*`` last-step rules (default:
        the first closure)."""
        if self.pos != 0:
            raise RuntimeError(
                f"run_horizon() called in the middle of a horizon (after {self.pos} of "
                f"{self.hopts.horizon} steps); finish it with step() first"
            )
        if len(closures) != self.hopts.horizon:
            raise ValueError(
                f"run_horizon() got {len(closures)} closures; the horizon is T={self.hopts.horizon} steps"
            )
        for c in closures:
            check_closure(c, "HyperSTE")
        self._check_memory(closures)
        return [self._user_step(c, evaluate, extra) for c in closures]

    def resume_horizon(self, closures: Sequence[Closure]) -> None:
        """After ``load_state_dict`` in the middle of a horizon: the closures of its first steps
        (bound to the new model), in order, so that the replays can run them again."""
        if len(closures) != self.pos:
            raise ValueError(
                f"resume_horizon() needs the {self.pos} closures of the steps already run in this "
                f"horizon, got {len(closures)}"
            )
        self.closures = list(closures)

    def _begin(self) -> None:
        """Start a horizon: the recalibration hook, the schedule's start (``warm_start=False``:
        the initial values; a hyper-optimizer keeps its state either way), the snapshot S."""
        if self.hopts.recalibrate is not None:
            self.hopts.recalibrate(self.model)
        if not self.hopts.warm_start and self.horizons > 0:
            with torch.no_grad():
                for s, x in zip(self.schedule, self.initial):
                    s.copy_(x.unsqueeze(0).expand_as(s))
        self.snap = self._capture(with_rng=True)
        self.closures, self.hparams, self.extra_closure = [], [], None
        self.replay, self.losses, self.final_losses = 0, [[]], []
        self._reset_collection()

    def _finish(self, evaluate: Evaluate) -> None:
        rng_end = _Rng({p.device for p in self._params()})  # the user's stream continues from here
        hp_end = self._group_hparams()
        stopped, good = False, [s.clone() for s in self.schedule]
        for r in range(self.hopts.replays):
            self.replay = r
            if r > 0:  # replay 0 was the user's pass
                try:
                    self.losses.append(self._pass(evaluate, collect=True))
                except NonFiniteLossError:  # θ^r diverged: back to θ^{r−1}, stop replaying
                    self._set_schedule(good)
                    self.nonfinite, stopped = self.nonfinite + 1, True
                    break
            good = [s.clone() for s in self.schedule]  # θ^r gave a finite trajectory
            try:
                # False: a non-finite hypergradient (θ unchanged; replaying would only repeat it)
                stopped = not self._end_replay(evaluate)
            except NonFiniteLossError:  # L_T on the extra batch: θ stays θ^r
                self._set_schedule(good)
                self.nonfinite, stopped = self.nonfinite + 1, True
            if stopped:
                break
        if self.hopts.final_pass or stopped:  # a stopped replay may have left a partial trajectory
            self.final_losses = self._pass(evaluate, collect=False)
        rng_end.restore()
        self._set_hparams(hp_end)
        self.horizons += 1
        self.pos = 0
        self.snap, self.closures, self.hparams, self.extra_closure = None, [], [], None
        self._reset_collection()

    def _pass(self, evaluate: Evaluate, collect: bool) -> list[float]:
        """Restore S and run the horizon's recorded steps with the current schedule."""
        self._restore(self.snap)
        out = []
        for t, closure in enumerate(self.closures):
            self._set_hparams(self.hparams[t])
            out.append(float(self._step(t, closure, evaluate, collect)))
        return out

    def _end_replay(self, evaluate: Evaluate) -> bool:
        """After a collected replay: the last-step rule's extra loss, the method's hypergradient,
        then θ ← clamp(θ − η_a·h). False if the hypergradient was not finite (θ unchanged)."""
        self._collect_end(evaluate)
        ok = self._update_schedule(self.hbuf)
        self._reset_collection()
        return ok

    def _extra_loss(self, evaluate: Evaluate) -> dict[int, Tensor]:
        """L_T on the extra batch at the weights after the last step, with θ_{T−1} (extra_carry) or
        the baseline (extra_ste) in its backward; returns its gradient per parameter index (managed
        weights: g ⊙ ψ). Buffers and RNG are left as they were."""
        live = self._capture(with_rng=True)
        theta = self._theta(self.hopts.horizon - 1)
        self._load_theta(theta if self.hopts.last == "extra_carry" else [torch.ones_like(x) for x in theta])
        evaluate(self.extra_closure if self.extra_closure is not None else self.closures[0])
        lam, _ = self._surrogate_grads()
        by_id = {id(self.managed[i].param): g for i, g in lam.items()}
        grads = {
            j: by_id.get(id(p), p.grad).detach().clone()
            for j, p in enumerate(self._params())
            if p.grad is not None
        }
        for p in self._params():
            p.grad = None
        self._restore(live, state=False)
        return grads

    @torch.no_grad()
    def _update_schedule(self, h: list[Tensor]) -> bool:
        self.hypergrad = [x.clone() for x in h]
        self.hypergrad_norm = float(sum(float((x.double() ** 2).sum()) for x in h)) ** 0.5
        if not all(bool(torch.isfinite(x).all()) for x in h):
            self.skipped += 1
            return False
        etas = [self.hyper_lr(k, x) for k, x in enumerate(h)]
        if self.hyper_opt is not None:
            for s, x, eta in zip(self.schedule, h, etas):
                # the hyper-optimizer's lr is hyper_lr; normalisation rescales the gradient it sees
                s.grad = x * (eta / self.opts.hyper_lr if self.opts.hyper_lr > 0 else 0.0)
            self.hyper_opt.step()
            for s in self.schedule:
                s.grad = None
        else:
            for s, x, eta in zip(self.schedule, h, etas):
                s.sub_(eta * x)
        T, per_step = self.hopts.horizon, self.hopts.schedule == "per_step"
        for mw, sl in zip(self.managed, self.slices):
            for s in self.schedule[sl]:
                s.clamp_(mw.surrogate.a_min, mw.surrogate.a_max)
                if per_step and T >= 2 and self.hopts.last == "carry":
                    s[T - 1] = s[T - 2]  # tied (the row is never read; kept equal for warm starts)
                if per_step and self.hopts.last == "ste":
                    s[T - 1] = 1.0
        return True

    # -- per-method parts ----------------------------------------------------------------------

    def _reset_collection(self) -> None:
        self.hbuf = [torch.zeros_like(s) for s in self.schedule]

    def _step(self, t: int, closure: Closure, evaluate: Evaluate, collect: bool) -> Tensor:
        """Step t of a pass with θ_t; ``collect``: gather what the replay's hypergradient needs."""
        raise NotImplementedError

    def _collect_end(self, evaluate: Evaluate) -> None:
        """After a collected replay's last step: finish its hypergradient in ``self.hbuf``."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------

    def horizon_stats(self) -> dict[str, Any]:
        """For ``HyperSTE.diagnostics["horizon"]``."""
        return {
            "T": self.hopts.horizon,
            "K": self.hopts.replays,
            "position": self.pos,
            "horizons_done": self.horizons,
            "replay_mean_loss": [sum(x) / len(x) for x in self.losses if x],
            "final_mean_loss": sum(self.final_losses) / len(self.final_losses) if self.final_losses else None,
            "skipped_replays": self.skipped,
            "nonfinite_replays": self.nonfinite,
            "memory_estimate": dict(self.memory_estimate),
        }

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(
            schedule=[s.clone() for s in self.schedule],
            initial=self.initial,
            hyper_opt=None if self.hyper_opt is None else self.hyper_opt.state_dict(),
            pos=self.pos,
            horizons=self.horizons,
            snap=None if self.snap is None else self.snap.state_dict(),
            hparams=self.hparams,
            hbuf=[x.clone() for x in self.hbuf],
            hypergrad=self.hypergrad,
            losses=[list(x) for x in self.losses],
            final_losses=list(self.final_losses),
            skipped=self.skipped,
            nonfinite=self.nonfinite,
            memory_estimate=dict(self.memory_estimate),
        )
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        with torch.no_grad():
            for s, x in zip(self.schedule, sd["schedule"]):
                s.copy_(x)  # in place: the hyper-optimizer holds these tensors
        self.initial = [x.clone() for x in sd["initial"]]
        if self.hyper_opt is not None:
            self.hyper_opt.load_state_dict(sd["hyper_opt"])
        self.pos, self.horizons = sd["pos"], sd["horizons"]
        self.snap = None if sd["snap"] is None else _Snap.from_state_dict(sd["snap"])
        self.hparams = [list(x) for x in sd["hparams"]]
        self.hbuf = [x.clone() for x in sd["hbuf"]]  # accumulated in place: never alias the caller's
        self.hypergrad = list(sd["hypergrad"])
        self.losses, self.final_losses = [list(x) for x in sd["losses"]], list(sd["final_losses"])
        self.skipped, self.nonfinite = sd["skipped"], sd["nonfinite"]
        self.memory_estimate = dict(sd["memory_estimate"])
        self.closures, self.replay = [], 0


class FAGU(Horizon):
    """``method="fagu"`` (SPEC §3.3; thesis 4.4 ATT = FAGU 5.3): greedy one-step hypergradients.

    In a collected replay, step t+1 (after its backward) gives::

        λ_{t+1} = g_{t+1} ⊙ ψ(u_{t+1}; θ_{t+1})                     (θ_{t+1} from the same schedule)
        h_t     = ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩,   v_{t+1}(θ) = OPT(v_t, g_t ⊙ ψ(u_t; θ), state_t)   (diffopt)

    the thesis's eq. 4.13 for any torch.optim optimizer (SGD: ∂v_{t+1}/∂θ_t = −η_w g_t ⊙ ∂ψ_t/∂θ).
    h_{T−1} needs L_T: the ``extra_*`` rules evaluate it on one extra batch. Memory: one pending
    record (v_t, g_t, u_t, state_t of the managed weights) at a time.
    """

    name = "fagu"

    def _reset_collection(self) -> None:
        super()._reset_collection()
        # (update record, raw grads, u, managed indices, θ_t per surrogate tensor, t)
        self.pending: tuple[UpdateRecord, list[Tensor], list[Tensor], list[int], list[Tensor], int] | None = (
            None
        )

    def _method_memory(self, snap_bytes: int) -> dict[str, int]:
        managed = sum(mw.param.numel() * mw.param.element_size() for mw in self.managed)
        return {"pending_record": 3 * managed}

    def _step(self, t: int, closure: Closure, evaluate: Evaluate, collect: bool) -> Tensor:
        theta = self._theta(t)
        self._load_theta(theta)
        loss = evaluate(closure)
        lam, raw = self._surrogate_grads()
        if collect and self.pending is not None:
            self._one_step(lam)
        for i, g in lam.items():
            self.managed[i].param.grad = g
        if collect and self._learned(t) and (t < self.hopts.horizon - 1 or self.hopts.extra):
            idx = sorted(raw)
            self.pending = (
                record_update(self.optimizer, [self.managed[i].param for i in idx]),
                [raw[i][0] for i in idx],
                [raw[i][1] for i in idx],
                idx,
                [x.clone() for x in theta],
                t,
            )
        self.optimizer.step()
        return loss

    def _one_step(self, lam: dict[int, Tensor]) -> None:
        """hbuf[row(t)] += ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩ for the pending step t."""
        record, grads, us, idx, theta, t = self.pending
        self.pending = None
        leaves, diff_grads = [], []
        for i, g, u in zip(idx, grads, us):
            mw = self.managed[i]
            th = [x.detach().clone().requires_grad_() for x in theta[self.slices[i]]]
            leaves.append(th)
            diff_grads.append(g * psi_differentiable(mw.surrogate, u, mw.qn, mw.qp, th))
        v_next = differentiable_update(record, diff_grads)
        keep = [n for n, i in enumerate(idx) if i in lam]  # weights with a gradient at step t+1 too
        flat = [x for n in keep for x in leaves[n]]
        hs = torch.autograd.grad(
            [v_next[n] for n in keep], flat, grad_outputs=[lam[idx[n]] for n in keep], allow_unused=True
        )
        it, row = iter(hs), self._row(t)
        for n in keep:
            for k in range(self.slices[idx[n]].start, self.slices[idx[n]].stop):
                h = next(it)
                if h is not None:
                    self.hbuf[k][row] += h

    def _collect_end(self, evaluate: Evaluate) -> None:
        if self.hopts.extra:
            grads = self._extra_loss(evaluate)
            pos = {id(p): j for j, p in enumerate(self._params())}
            lam = {
                i: grads[pos[id(mw.param)]] for i, mw in enumerate(self.managed) if pos[id(mw.param)] in grads
            }
            if self.pending is not None:
                self._one_step(lam)
        self.pending = None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.pending is not None:
            record, grads, us, idx, theta, t = self.pending
            sd["pending"] = {
                "record": record.state_dict(),
                "grads": grads,
                "u": us,
                "idx": idx,
                "theta": theta,
                "t": t,
            }
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        p = sd.get("pending")
        self.pending = (
            None
            if p is None
            else (
                UpdateRecord.from_state_dict(type(self.optimizer), p["record"]),
                list(p["grads"]),
                list(p["u"]),
                list(p["idx"]),
                list(p["theta"]),
                p["t"],
            )
        )


class PFAGU(FAGU):
    """``method="pfagu"`` (SPEC §3.3; thesis "Relaxed ATT" 4.4 = P-FAGU 5.4): FAGU over consecutive
    horizons (the thesis: T = 1 epoch, K = 5 a-updates per epoch, E = 100 epochs), warm-started
    from the previous horizon's schedule. Defaults: ``replays=5``, ``schedule="shared"`` (one θ
    per horizon: "the optimal LSTE parameter for it [the epoch]")."""

    name = "pfagu"


class LGATT(Horizon):
    """``method="lgatt"`` (SPEC §3.4; thesis 4.5 LGATT = FLAGU 5.3): every θ_t of the horizon gets
    the hypergradient of the final loss L_F — F = T with an ``extra_*`` rule (L_T on the extra
    batch), else F = T−1 (the horizon's last loss; θ_{T−1} then does not affect it and follows
    the carry/ste rule)::

        ∂L_F/∂θ_j = λ_{j+1}ᵀ ∂x_{j+1}/∂θ_j,   λ_F = ∇L_F,   λ_t = (∂x_{t+1}/∂x_t)ᵀ λ_{t+1}

    with x_t = (all parameters, optimizer state) and x_{t+1} = OPT(x_t, ∇L_t(x_t) with ψ(u_t; θ_t)).
    For SGD on the managed weights alone this is the SPEC's λ_t = (I − η_w H_t) λ_{t+1}.

    ``hessian="exact"``: a reverse sweep. During the replay each step stores x_t, its buffers, the
    group hyperparameters and the RNG state before its closure (T × |x| memory, no graph). After
    it, for t = F−1 … 0: restore x_t, recompute step t on its batch with θ_t as autograd leaves and
    ψ applied inside the quantizer's backward (so every ∂v̂/∂v, also the one inside g_t, is the
    surrogate ψ(u_t; θ_t): H_t = ∂(g_t ⊙ ψ_t)/∂v_t of the surrogate gradient), build x_{t+1} by
    :func:`~metaste.optim.diffopt.differentiable_step` (differentiable in v_t, the optimizer
    state and θ_t) and take ONE vector-Jacobian product with (λ_{t+1}, λ^state_{t+1}): it gives
    λ_t, λ^state_t and h_t (one Hessian-vector product per step). Only one step's graph exists at
    a time: memory grows as T × |x|, not with an unrolled create_graph trajectory. On the smooth
    stand-in model (forward Ψ with Ψ' = ψ) this is the exact derivative of L_F (tested against
    finite differences with SGD and Adam). Two approximations remain: SLSTE's ∂ψ/∂a is autograd's
    (``boundary="none"``; ``"window"`` is refused) and, for Adam-like optimizers, elements with an
    exactly zero surrogate gradient enter the update as constants (``diffopt``'s masking).

    ``hessian="diag"`` (the thesis's element-wise approximation, eqs. 4.18–4.22: products of
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

    name = "lgatt"

    def _reset_collection(self) -> None:
        super()._reset_collection()
        self.trace: list[_Snap] = []
        self.final_grads: dict[int, Tensor] | None = None  # λ_F per parameter index (non-extra rules)

    def _method_memory(self, snap_bytes: int) -> dict[str, int]:
        return {"trace": self.hopts.horizon * snap_bytes}

    def _final_step(self) -> int:
        return self.hopts.horizon if self.hopts.extra else self.hopts.horizon - 1

    def _step(self, t: int, closure: Closure, evaluate: Evaluate, collect: bool) -> Tensor:
        self._load_theta(self._theta(t))
        if collect and t < self._final_step():
            self.trace.append(self._capture(with_rng=True))
        loss = evaluate(closure)
        lam, _ = self._surrogate_grads()
        for i, g in lam.items():
            self.managed[i].param.grad = g
        if collect and t == self._final_step():  # non-extra rules: λ_F is this step's gradient
            self.final_grads = {
                j: p.grad.detach().clone() for j, p in enumerate(self._params()) if p.grad is not None
            }
        self.optimizer.step()
        return loss

    def _collect_end(self, evaluate: Evaluate) -> None:
        lam_f = self._extra_loss(evaluate) if self.hopts.extra else self.final_grads
        live = self._capture(with_rng=True)
        if self.hopts.hessian == "exact":
            self._sweep_exact(lam_f)
        else:
            self._sweep_diag(lam_f)
        self._restore(live, state=False)
        self.trace, self.final_grads = [], None

    def _recompute(self, t: int, params: list[Tensor]) -> list[list[Tensor]]:
        """Set the model to step t's stored inputs (parameters, buffers, RNG) and return fresh
        autograd leaves holding θ_t, one list per managed weight."""
        snap = self.trace[t]
        with torch.no_grad():
            for p, x in zip(params, snap.params):
                p.copy_(x)
            for b, x in zip(self.buffers, snap.buffers):
                b.copy_(x)
        snap.rng.restore()
        theta = self._theta(t)
        return [
            [theta[k].detach().clone().requires_grad_() for k in range(sl.start, sl.stop)]
            for sl in self.slices
        ]

    def _add_h(self, t: int, hs: dict[int, Tensor | None]) -> None:
        """hbuf[row(t)] += h_t; ``hs`` maps a surrogate-tensor index to its gradient."""
        if not self._learned(t):
            return
        row = self._row(t)
        for k, h in hs.items():
            if h is not None:
                self.hbuf[k][row] += h

    def _record(self, t: int, idx: list[int], states: list[dict[str, Any]]) -> UpdateRecord:
        """The UpdateRecord of step t for the parameters ``idx`` (stored v_t, hyperparameters)."""
        groups, gi = self.hparams[t], self._group_index()
        return UpdateRecord(
            type(self.optimizer), [self.trace[t].params[j] for j in idx], states, [groups[gi[j]] for j in idx]
        )

    def _sweep_exact(self, lam_f: dict[int, Tensor]) -> None:
        params = self._params()
        lam_x = [lam_f.get(j, torch.zeros_like(p)) for j, p in enumerate(params)]
        lam_s: list[dict[str, Tensor]] = [{} for _ in params]  # L_F does not depend on the state
        for t in reversed(range(len(self.trace))):
            snap = self.trace[t]
            leaves = self._recompute(t, params)
            with _surrogates_as(self.managed, leaves), torch.enable_grad():
                loss = self.closures[t]()
                req = [j for j, p in enumerate(params) if p.requires_grad]
                grads = torch.autograd.grad(
                    loss, [params[j] for j in req], create_graph=True, allow_unused=True
                )
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
                    self._record(t, idx, states), grads, params=[params[j] for j in idx], states=states
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
            self._add_h(t, dict(enumerate(gs[m + s :])))

    def _sweep_diag(self, lam_f: dict[int, Tensor]) -> None:
        params = self._params()
        pos = {id(p): j for j, p in enumerate(params)}
        gi = self._group_index()
        mu = {
            i: lam_f.get(pos[id(mw.param)], torch.zeros_like(mw.param)) for i, mw in enumerate(self.managed)
        }
        for t in reversed(range(len(self.trace))):
            snap = self.trace[t]
            leaves = self._recompute(t, params)
            with _surrogates_as(self.managed, leaves), torch.enable_grad():
                loss = self.closures[t]()
                grads = torch.autograd.grad(
                    loss, [mw.param for mw in self.managed], create_graph=True, allow_unused=True
                )
                used = [i for i, g in enumerate(grads) if g is not None]
                js = [pos[id(self.managed[i].param)] for i in used]
                v_next = differentiable_update(
                    self._record(t, js, [snap.states[j] for j in js]), [grads[i] for i in used]
                )
                ks = [k for i in used for k in range(self.slices[i].start, self.slices[i].stop)]
                hs = torch.autograd.grad(
                    v_next,
                    [
                        leaves[i][k - self.slices[i].start]
                        for i in used
                        for k in range(self.slices[i].start, self.slices[i].stop)
                    ],
                    grad_outputs=[mu[i] for i in used],
                    retain_graph=True,
                    allow_unused=True,
                )
                zs = [
                    _rademacher(self.managed[i].param, self.hopts.seed, self.horizons, self.replay, t, i)
                    for i in used
                ]
                hz = torch.autograd.grad(
                    [grads[i] for i in used],
                    [self.managed[i].param for i in used],
                    grad_outputs=zs,
                    allow_unused=True,
                )
            self._add_h(t, dict(zip(ks, hs)))
            for i, j, z, hzi in zip(used, js, zs, hz):
                d = z * hzi if hzi is not None else torch.zeros_like(z)
                hp = self.hparams[t][gi[j]]
                mu[i] = mu[i] * (1 - float(hp["lr"]) * (d + float(hp.get("weight_decay", 0.0))))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["trace"] = [x.state_dict() for x in self.trace]
        sd["final_grads"] = self.final_grads
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.trace = [_Snap.from_state_dict(x) for x in sd["trace"]]
        self.final_grads = None if sd["final_grads"] is None else dict(sd["final_grads"])
