"""Horizon methods of HyperSTE (docs/design.md §3.3–3.4): ``fagu`` (All Times Together, thesis 4.4 = FAGU
5.3), ``pfagu`` (its relaxed per-epoch form, thesis 4.4 "Relaxed ATT" = P-FAGU 5.4) and ``lgatt``
(Less-Greedy ATT, thesis 4.5 = FLAGU 5.3). This module holds the runtime the three share: the
replay protocol, the schedules and snapshots (:class:`HorizonMethod`; its memory estimate is
:mod:`.horizon_memory`); their
options are :class:`~.horizon_options.HorizonOptions`, the hypergradients are in :mod:`.fagu` and
:mod:`.lgatt`.

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
:mod:`metaste.optim.hyper.diffopt`; nothing here re-derives an optimizer.

The step-driven API (docs/design.md §3.3, a decision): the user's ``opt.step(closure)`` loop is unchanged. The
user's pass over a horizon is replay 0: each ``step`` runs with θ^0, returns that step's loss and
records the closure (a closure must be re-callable: it captures its batch, it does not pull a new
one). The horizon's last ``step`` runs replays 1..K−1 and the final pass itself and returns with
the weights at the end of the final pass: the cost is (K+1)× plain training plus the
hypergradients. :meth:`Horizon.run_horizon` does the same for a list of closures. Afterwards the
global RNG continues from its state at the end of the user's pass, so K does not change the
user's random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..core.closure import Closure, NonFiniteLossError, check_closure
from ..core.snapshot import RngState, Snapshot, clone_value
from ._common import Evaluate, HyperMethod, ManagedWeight
from .horizon_memory import HorizonMemory
from .horizon_options import HorizonOptions

__all__ = ["HorizonMethod"]


class HorizonMethod(HorizonMemory, HyperMethod):
    """Replays, schedules, snapshots and the step-driven protocol shared by fagu / pfagu / lgatt.

    Subclasses say how a replay's hypergradient is collected (:class:`~.fagu.FAGUMethod`:
    one-step, during the replay; :class:`~.lgatt.LGATTMethod`: a reverse sweep after it).
    :meth:`step` replaces the per-step hooks of :class:`HyperMethod`.

    Schedule layout: per surrogate tensor θ_k a tensor of shape ``[S, *θ_k.shape]`` with S = T
    (``per_step``) or 1 (``shared``). Step t uses row ``t`` (``0`` if shared), except the last step
    under ``last="carry"`` (row T−2: tied to the previous step) or ``last="ste"`` (the baseline
    a = 1, not learned). With ``"extra_carry"``/``"extra_ste"`` the loss L_T is evaluated after the
    last step on one extra batch (the horizon's first batch in the step-driven API; ``extra=`` of
    :meth:`run_horizon`) with θ_{T−1} / the baseline in its backward, so θ_{T−1} is learned too.
    """

    opts: HorizonOptions

    def __init__(
        self,
        optimizer: Optimizer,
        managed: list[ManagedWeight],
        opts: HorizonOptions,
        model: nn.Module | None,
    ) -> None:
        super().__init__(optimizer, managed, opts, model)
        assert model is not None  # HorizonOptions.check
        theta_ids = {id(t) for t in self.tensors}
        self.buffers = [b for _, b in model.named_buffers() if id(b) not in theta_ids]
        rows = opts.horizon if opts.schedule == "per_step" else 1
        self.initial = [t.detach().clone() for t in self.tensors]
        self.schedule = [t.detach().unsqueeze(0).repeat((rows,) + (1,) * t.dim()) for t in self.tensors]
        self.hyper_opt = (
            opts.hyper_optimizer(self.schedule, lr=opts.hyper_lr, **opts.hyper_optimizer_kwargs)
            if opts.hyper_optimizer is not None
            else None
        )
        self.pos = 0  # steps of the user's pass done in the current horizon
        self.horizons = 0  # completed horizons
        self.replay = 0  # index of the pass being collected (0 = the user's)
        self.closures: list[Closure] = []
        self.extra_closure: Closure | None = None
        self.snap: Snapshot | None = None
        self.hparams: list[list[dict[str, Any]]] = []  # per step: each group's hyperparameters
        self.hbuf = [torch.zeros_like(s) for s in self.schedule]
        self.hypergrad = [torch.zeros_like(s) for s in self.schedule]  # of the last replay
        self.losses: list[list[float]] = []  # per collected replay of the current/last horizon
        self.final_losses: list[float] = []
        self.skipped = 0  # replays whose hypergradient was not finite (θ unchanged)
        self.nonfinite = 0  # replays stopped by a non-finite loss (θ rolled back)
        self.memory_estimate: dict[str, int] = {}
        self._reset_collection()  # the method's per-horizon fields exist before the first step

    # -- bookkeeping --------------------------------------------------------------------------

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _group_index(self) -> list[int]:
        return [i for i, g in enumerate(self.optimizer.param_groups) for _ in g["params"]]

    def _row(self, t: int) -> int:
        """The schedule row step t reads (and its hypergradient goes to)."""
        if self.opts.schedule == "shared":
            return 0
        return self.opts.horizon - 2 if t == self.opts.horizon - 1 and self.opts.last == "carry" else t

    def _theta(self, t: int) -> list[Tensor]:
        """θ_t, one tensor per surrogate tensor (the baseline a = 1 for the last step under "ste")."""
        if t == self.opts.horizon - 1 and self.opts.last == "ste":
            return [torch.ones_like(x) for x in self.tensors]
        r = self._row(t)
        return [s[r] for s in self.schedule]

    def _learned(self, t: int) -> bool:
        """Whether θ_t is a learned schedule entry (not the baseline)."""
        return not (t == self.opts.horizon - 1 and self.opts.last == "ste")

    @torch.no_grad()
    def _set_schedule(self, values: list[Tensor]) -> None:
        for s, x in zip(self.schedule, values):
            s.copy_(x)  # in place: the hyper-optimizer holds these tensors

    @torch.no_grad()
    def _load_theta(self, values: list[Tensor]) -> None:
        for t, v in zip(self.tensors, values):
            t.copy_(v)

    def _capture(self, with_rng: bool) -> Snapshot:
        return Snapshot.capture(self._params(), self.optimizer, self.buffers, with_rng)

    def _restore(self, snap: Snapshot, *, state: bool = True) -> None:
        snap.restore(self._params(), self.optimizer, self.buffers, state=state)

    def _group_hparams(self) -> list[dict[str, Any]]:
        return [
            {k: clone_value(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]

    def _set_hparams(self, hps: list[dict[str, Any]]) -> None:
        for g, hp in zip(self.optimizer.param_groups, hps):
            g.update({k: clone_value(v) for k, v in hp.items()})

    # -- the step-driven protocol --------------------------------------------------------------

    def step(self, closure: Closure | None, evaluate: Evaluate, t: int = 0) -> Tensor:
        """One step of the user's pass (replay 0); the horizon's last step also runs replays
        1..K−1 and the final pass. Returns this step's loss with θ^0. (``t``, the wrapper's step
        count, is not used: the position in the horizon is the method's own.)"""
        if self.pos > 0 and len(self.closures) != self.pos:
            raise RuntimeError(
                f"this HyperSTE was loaded from a state_dict saved after step {self.pos} of a horizon; "
                f"give it that horizon's first {self.pos} closures with opt.resume_horizon(closures) "
                "before the next step (closures cannot be saved in a state_dict)"
            )
        check_closure(closure, "HyperSTE")
        est = self._check_memory([closure]) if self.pos == 0 else None
        loss = self._user_step(closure, evaluate, None)
        if est is not None:  # a step that raised leaves the last estimate
            self.memory_estimate = est
        return loss

    def _user_step(self, closure: Closure, evaluate: Evaluate, extra: Closure | None) -> Tensor:
        # a step of the user's pass that raises (a non-finite loss, a bad closure) leaves the
        # horizon's bookkeeping as it was (docs/design.md §5); the attributes are reassigned or
        # appended to before the base step, so a shallow copy with copied lists is enough
        saved = {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}
        try:
            if self.pos == 0:
                self._begin()
            if extra is not None:
                self.extra_closure = extra
            self.hparams.append(self._group_hparams())
            loss = self._step(self.pos, closure, evaluate, collect=True)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        self.closures.append(closure)
        self.losses[0].append(float(loss))
        self.pos += 1
        if self.pos == self.opts.horizon:
            self._finish(evaluate)
        return loss

    def run_horizon(
        self, closures: Sequence[Closure], evaluate: Evaluate, extra: Closure | None
    ) -> list[Tensor]:
        """Run one whole horizon over ``closures`` (T re-callable closures); returns the user-pass
        losses (θ^0). ``extra``: the batch of L_T for the ``extra_*`` last-step rules (default:
        the first closure)."""
        if self.pos != 0:
            raise RuntimeError(
                f"run_horizon() called in the middle of a horizon (after {self.pos} of "
                f"{self.opts.horizon} steps); finish it with step() first"
            )
        if len(closures) != self.opts.horizon:
            raise ValueError(
                f"run_horizon() got {len(closures)} closures; the horizon is T={self.opts.horizon} steps"
            )
        for c in closures:
            check_closure(c, "HyperSTE")
        self.memory_estimate = self._check_memory(closures)
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
        if self.opts.recalibrate is not None:
            self.opts.recalibrate(self.model)
        if not self.opts.warm_start and self.horizons > 0:
            with torch.no_grad():
                for s, x in zip(self.schedule, self.initial):
                    s.copy_(x.unsqueeze(0).expand_as(s))
        self.snap = self._capture(with_rng=True)
        self.closures, self.hparams, self.extra_closure = [], [], None
        self.replay, self.losses, self.final_losses = 0, [[]], []
        self._reset_collection()

    def _finish(self, evaluate: Evaluate) -> None:
        rng_end = RngState(
            {p.device for p in self._params()}, python=True
        )  # the user's stream continues from here
        hp_end = self._group_hparams()
        stopped, good = False, [s.clone() for s in self.schedule]
        for r in range(self.opts.replays):
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
        if self.opts.final_pass or stopped:  # a stopped replay may have left a partial trajectory
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
        theta = self._theta(self.opts.horizon - 1)
        self._load_theta(theta if self.opts.last == "extra_carry" else [torch.ones_like(x) for x in theta])
        evaluate(self.extra_closure if self.extra_closure is not None else self.closures[0])
        lam, _ = self.surrogate_grads()
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

    def _update_schedule(self, h: list[Tensor]) -> bool:
        self.hypergrad = [x.clone() for x in h]
        if not self.apply_hypergradient(self.schedule, h, self.hyper_opt):
            self.skipped += 1
            return False
        T, per_step = self.opts.horizon, self.opts.schedule == "per_step"
        with torch.no_grad():
            for mw, sl in zip(self.managed, self.slices):
                for s in self.schedule[sl]:
                    s.clamp_(mw.surrogate.a_min, mw.surrogate.a_max)
                    if per_step and T >= 2 and self.opts.last == "carry":
                        s[T - 1] = s[T - 2]  # tied (the row is never read; kept equal for warm starts)
                    if per_step and self.opts.last == "ste":
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

    def diagnostics(self) -> dict[str, Any]:
        """``horizon``: the horizon's position, replay losses, skipped replays, memory estimate."""
        return {"horizon": self.horizon_stats()}

    def horizon_stats(self) -> dict[str, Any]:
        return {
            "T": self.opts.horizon,
            "K": self.opts.replays,
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
        self.snap = None if sd["snap"] is None else Snapshot.from_state_dict(sd["snap"])
        self.hparams = [list(x) for x in sd["hparams"]]
        self.hbuf = [x.clone() for x in sd["hbuf"]]  # accumulated in place: never alias the caller's
        self.hypergrad = list(sd["hypergrad"])
        self.losses, self.final_losses = [list(x) for x in sd["losses"]], list(sd["final_losses"])
        self.skipped, self.nonfinite = sd["skipped"], sd["nonfinite"]
        self.memory_estimate = dict(sd["memory_estimate"])
        self.closures, self.replay = [], 0
