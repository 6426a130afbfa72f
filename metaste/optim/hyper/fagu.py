"""``method="fagu"`` and ``method="pfagu"`` (docs/design.md §3.3; thesis 4.4 ATT = FAGU 5.3 and
"Relaxed ATT" = P-FAGU 5.4): greedy one-step hypergradients over a replayed horizon.

The replay protocol is :class:`~.horizon.HorizonMethod`; the hypergradient is
:func:`~metaste.optim.hyper.diffopt.one_step_hypergradient`, the same function ``delayed`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..core.closure import Closure
from ._common import Evaluate, PendingStep
from ._options import runs
from .horizon import HorizonMethod
from .horizon_options import HorizonOptions

__all__ = ["FAGU", "PFAGU", "FAGUMethod"]


@dataclass(frozen=True)
class FAGU(HorizonOptions):
    """Options of ``method="fagu"`` (docs/design.md §3.3): the horizon options
    (:class:`~.horizon_options.HorizonOptions`; defaults ``replays=50``, ``schedule="per_step"``)."""

    name = "fagu"


@dataclass(frozen=True)
class PFAGU(FAGU):
    """Options of ``method="pfagu"`` (docs/design.md §3.3; thesis "Relaxed ATT" 4.4 = P-FAGU 5.4):
    FAGU over consecutive horizons (the thesis: T = 1 epoch, K = 5 a-updates per epoch, E = 100
    epochs), warm-started from the previous horizon's schedule. Defaults: ``replays=5``,
    ``schedule="shared"`` (one θ per horizon: "the optimal LSTE parameter for it [the epoch]")."""

    name = "pfagu"
    default_replays = 5
    default_schedule = "shared"


@runs(FAGU)
class FAGUMethod(HorizonMethod):
    """Greedy one-step hypergradients (fagu, pfagu). In a collected replay, step t+1 (after its
    backward) gives::

        λ_{t+1} = g_{t+1} ⊙ ψ(u_{t+1}; θ_{t+1})                     (θ_{t+1} from the same schedule)
        h_t     = ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩,   v_{t+1}(θ) = OPT(v_t, g_t ⊙ ψ(u_t; θ), state_t)

    the thesis's eq. 4.13 for any torch.optim optimizer (SGD: ∂v_{t+1}/∂θ_t = −η_w g_t ⊙ ∂ψ_t/∂θ).
    h_{T−1} needs L_T: the ``extra_*`` rules evaluate it on one extra batch. Memory: one pending
    record (v_t, g_t, u_t, state_t of the managed weights) at a time.
    """

    def _reset_collection(self) -> None:
        super()._reset_collection()
        self.pending: PendingStep | None = None

    def _method_memory(self, snap_bytes: int) -> dict[str, int]:
        managed = sum(mw.param.numel() * mw.param.element_size() for mw in self.managed)
        return {"pending_record": 3 * managed}

    def _step(self, t: int, closure: Closure, evaluate: Evaluate, collect: bool) -> Tensor:
        theta = self._theta(t)
        self._load_theta(theta)
        loss = evaluate(closure)
        lam, raw = self.surrogate_grads()
        if collect and self.pending is not None:
            self._one_step(lam)
        for i, g in lam.items():
            self.managed[i].param.grad = g
        if collect and self._learned(t) and (t < self.opts.horizon - 1 or self.opts.extra):
            self.pending = self.record_pending(raw, [x.clone() for x in theta], t)
        self.optimizer.step()
        return loss

    def _one_step(self, lam: dict[int, Tensor]) -> None:
        """hbuf[row(t)] += ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩ for the pending step t."""
        pending, self.pending = self.pending, None
        row = self._row(pending.t)
        for k, h in self.pending_hypergradient(pending, lam):
            self.hbuf[k][row] += h

    def _collect_end(self, evaluate: Evaluate) -> None:
        if self.opts.extra:
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
            sd["pending"] = self.pending.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        p = sd.get("pending")
        self.pending = None if p is None else PendingStep.from_state_dict(type(self.optimizer), p)
