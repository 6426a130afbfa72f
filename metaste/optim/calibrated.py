"""Calibrated surrogate: ψ(u; a, λ) fitted to zeroth-order probes (docs/design.md §9).

FOGZO measures the loss along random directions and forgets the measurement after one step; the
calibrated wrapper keeps it. Every K steps it probes like FOGZO and fits the surrogate's
parameters θ = (a, λ) per layer (or per output channel) so that the surrogate's *predicted*
directional derivatives match the *measured* ones; between probes it is a plain surrogate-gradient
step (plain-STE cost). The math is :func:`probe_features` (the linear model ĉ_i = f_iᵀθ) and
:class:`NormalEquations` (the discounted, ridge-regularised least squares); :class:`Calibrated`
does the bookkeeping.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..quant.leaky import LeakySurrogate
from ..quant.psi import band
from ..quant.registry import QuantEntry, lookup
from .core.closure import Closure
from .core.noise import derive_seed, noise, rademacher
from .core.probe import Probe
from .core.wrapper import OptimizerWrapper, check_quantized_dtypes
from .fogzo.estimator import fogzo_estimate, joint_norm
from .fogzo.smoothing import SMOOTHINGS

__all__ = ["Calibrated", "NormalEquations", "probe_features", "PROBE_UPDATES", "RIDGE_TO"]

PROBE_UPDATES = ("surrogate", "fogzo")
RIDGE_TO = ("current", "ste")


def _group_sum(x: Tensor, pshape: torch.Size) -> Tensor:
    return x.sum_to_size(pshape).reshape(-1)


def probe_features(
    grads: Sequence[Tensor],
    guides: Sequence[Tensor],
    inside: Sequence[Tensor],
    eps: Sequence[Tensor],
    kinds: Sequence[str],
    pshapes: Sequence[torch.Size],
    *,
    beta: float,
    n: int,
    seed: int,
    step: int,
) -> Tensor:
    """The features F (n × P) of the linear model ĉ_i(θ) = Σ_k ⟨g_k ⊙ ψ(u_k; θ_k), ε_k ⊙ d_ik⟩ = F_i·θ
    (docs/design.md §9), θ = [a_0, λ_0, a_1, λ_1, …] flattened per tensor.

    ``grads[k]`` is the raw g_k = ∂L/∂v̂_k, ``inside[k]`` the band mask 1{−Qn ≤ u ≤ Qp},
    ``guides[k]`` the surrogate gradient g_k ⊙ ψ_k that FOGZO's mixed directions tilt toward (unused
    at β = 0). The directions d_ik are exactly those
    :func:`~metaste.optim.fogzo.estimator.fogzo_estimate` draws with the same (seed, step, β):
    ε⊙d = √(1−β)·ε⊙z + (√β σ_i / N)·ε²⊙guide.
    """
    norm = joint_norm(guides, eps) if beta > 0 else 0.0
    inv = 1.0 / norm if 0.0 < norm < math.inf else 0.0
    ga, gb = math.sqrt(beta) * inv, math.sqrt(1.0 - beta)
    rows = []
    for i in range(n):
        sigma = rademacher(seed, step, i)
        parts = []
        for k, g in enumerate(grads):
            v_shape = g.shape
            ed = torch.zeros_like(g)
            if gb != 0.0:
                ed = noise(kinds[k], v_shape, derive_seed(seed, step, i, k), g.device, g.dtype).mul_(
                    eps[k] * gb
                )
            if ga != 0.0:
                ed.addcmul_(guides[k], eps[k] * eps[k], value=ga * sigma)
            ged = ed.mul_(g)
            x = ged * inside[k]
            parts += [_group_sum(x, pshapes[k]), _group_sum(ged.sub_(x), pshapes[k])]
        rows.append(torch.cat(parts).to(torch.float64))
    return torch.stack(rows)


class NormalEquations:
    """Discounted least squares with a diagonal ridge toward a reference (docs/design.md §9)::

        A ← ρA + FᵀF,   b ← ρb + Fᵀc
        θ = argmin Σ_i w_i (c_i − F_i θ)² + Σ_j μ_j (θ_j − θ_ref,j)²,   μ_j = ridge·A_jj + 1e−9·mean(diag A)

    (w_i = ρ^(age of probe i)). The diagonal ridge is scale-free: a's and λ's features can differ by
    orders of magnitude. A parameter whose feature was never seen (A_jj = 0) keeps θ_ref.
    """

    def __init__(self, size: int, rho: float, ridge: float) -> None:
        self.A = torch.zeros(size, size, dtype=torch.float64)
        self.b = torch.zeros(size, dtype=torch.float64)
        self.rho, self.ridge = rho, ridge

    def add(self, F: Tensor, c: Tensor) -> None:
        self.A.mul_(self.rho).add_(F.T @ F)
        self.b.mul_(self.rho).add_(F.T @ c.to(torch.float64))

    def solve(self, ref: Tensor) -> Tensor | None:
        d = self.A.diagonal()
        if not bool(d.max() > 0):
            return None
        # an unseen parameter (A_jj = 0: its row and column of A are 0) gets θ_j = μ_jθ_ref,j/μ_j
        mu = self.ridge * d + 1e-9 * d.mean()
        A = self.A + torch.diag(mu)
        rhs = self.b + mu * ref
        theta = torch.linalg.solve(A, rhs)
        return theta if bool(torch.isfinite(theta).all()) else None

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A.clone(), "b": self.b.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.A.copy_(sd["A"])
        self.b.copy_(sd["b"])


@dataclass(frozen=True)
class Managed:
    entry: QuantEntry
    surrogate: LeakySurrogate


class Calibrated(OptimizerWrapper):
    r"""Train with a leaky surrogate ψ(u; a, λ) whose (a, λ) are fitted to zeroth-order probes.

    Example::

        model = metaste.quantize_model(net, bits=2, surrogate="leaky", granularity="tensor")
        opt = metaste.Calibrated(torch.optim.SGD(model.parameters(), lr=0.1), every=10)
        loss = opt.step(lambda: F.cross_entropy(model(x), y))

    ψ = a on the grid's band, λ (the leak) outside: (1, 0) is the clipped STE, (1, 1) the identity
    STE. Every ``every`` steps (a *probe step*, docs/design.md §9) the wrapper takes the raw
    g = ∂L/∂v̂, draws n FOGZO directions d_i (ε = ε̄·s, docs/design.md §4.3), measures
    c_i = [L(v + ε⊙d_i) − L(v − ε⊙d_i)]/2 with two no-grad passes, and fits θ by discounted
    least squares of c_i on the predicted ĉ_i = Σ_k ⟨g_k⊙ψ(u_k; θ_k), ε_k⊙d_ik⟩ (linear in θ).
    The other steps are plain surrogate-gradient steps (one forward + backward).

    Args:
        optimizer: the base optimizer; its quantized weights must use the ``"leaky"`` surrogate.
        every (int or None, default 10): K, the probe period; ``None`` disables the probes (the
            wrapper is then bitwise the bare optimizer with ψ(u; a, λ) at its initial θ).
        n (int, default 1): directions per probe step.
        rho (float in (0, 1], default 0.99): discount of older probes (ρ = 1: plain sum); the
            design note's 0.9 keeps ~10 probes and lets a jump across its whole clamp range.
        ridge (float ≥ 0, default 0.1): diagonal ridge, relative to the features' energy.
        ridge_to (``"current"`` | ``"ste"``): the ridge pulls toward the current θ or (1, 0).
        a_range (default (0.1, 10)), lam_max (default 1.0): the clamp a ∈ a_range, λ ∈ [0, lam_max].
        beta (float in [0, 1], default 0): 0 = pure noise directions; > 0 tilts them toward the
            surrogate gradient as FOGZO does.
        probe_update (``"surrogate"`` | ``"fogzo"``): the update of a probe step: g ⊙ ψ with the
            freshly fitted θ (default) or FOGZO's estimate G (docs/design.md §9 explains why the
            default departs from "probe steps are FOGZO steps").
        seed (int): seeds the directions (identical on every run with the same seed).
        grad_scaler, max_grad_norm: fp16 loss scaling and gradient clipping, as in
            :class:`~metaste.FOGZO` (docs/design.md §5.1).

    A non-finite probe loss keeps the surrogate gradient for that step, skips the fit, counts it
    in :attr:`fallbacks` and warns once. :attr:`history` holds (step, [(mean a, mean λ) per layer]).
    """

    SETTINGS = ("every", "n", "beta", "seed")

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        every: int | None = 10,
        n: int = 1,
        rho: float = 0.99,
        ridge: float = 0.1,
        ridge_to: str = "current",
        a_range: tuple[float, float] = (0.1, 10.0),
        lam_max: float = 1.0,
        beta: float = 0.0,
        probe_update: str = "surrogate",
        seed: int = 0,
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
    ) -> None:
        _check_int("every", every, 1, allow_none=True)
        _check_int("n", n, 1)
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"Invalid rho: {rho}; the discount must lie in (0, 1]")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"Invalid ridge: {ridge}; it must be finite and >= 0")
        if ridge_to not in RIDGE_TO:
            raise ValueError(f"Invalid ridge_to: {ridge_to!r}; choose one of {RIDGE_TO}")
        lo, hi = a_range
        if not 0.0 < lo <= 1.0 <= hi < math.inf:
            raise ValueError(f"Invalid a_range: {a_range}; need 0 < a_min <= 1 <= a_max < inf")
        if not 0.0 <= lam_max < math.inf:
            raise ValueError(f"Invalid lam_max: {lam_max}; it must be finite and >= 0")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"Invalid beta: {beta}; it must lie in [0, 1]")
        if probe_update not in PROBE_UPDATES:
            raise ValueError(f"Invalid probe_update: {probe_update!r}; choose one of {PROBE_UPDATES}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        super().__init__(optimizer, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        check_quantized_dtypes(self.params(), "Calibrated")
        self.every, self.n, self.beta, self.seed = every, n, float(beta), seed
        self.ridge_to, self.a_range, self.lam_max, self.probe_update = (
            ridge_to,
            (lo, hi),
            lam_max,
            probe_update,
        )
        self.managed = self._find_managed()
        size = sum(2 * m.surrogate.a.numel() for m in self.managed)
        self.normal = NormalEquations(size, rho, ridge)
        self.steps = 0
        self.probes = 0
        self.fallbacks = 0
        self.history: list[tuple[int, list[tuple[float, float]]]] = []
        self._warned = False

    def _find_managed(self) -> list[Managed]:
        out, other = [], []
        for p in self.params():
            entry = lookup(p)
            if entry is None or not p.requires_grad:
                continue
            if isinstance(entry.surrogate, LeakySurrogate):
                out.append(Managed(entry, entry.surrogate))
            else:
                other.append(getattr(entry.surrogate, "name", type(entry.surrogate).__name__))
        if other:
            raise ValueError(
                f"Calibrated fits the 'leaky' surrogate ψ(u; a, λ); {len(other)} quantized weight(s) use "
                f"{sorted(set(other))}, which it cannot calibrate. Quantize with "
                "metaste.quantize_model(net, surrogate='leaky', granularity='tensor' or 'channel')"
            )
        if not out:
            raise ValueError(
                "Calibrated found no quantized weight among the optimizer's parameters; quantize the "
                "model with metaste.quantize_model(net, surrogate='leaky', granularity='tensor') first"
            )
        return out

    # -- θ as one vector ----------------------------------------------------------------------

    def theta(self) -> Tensor:
        """θ = [a_0, λ_0, a_1, λ_1, …] (float64, flattened per tensor)."""
        return torch.cat(
            [t.detach().reshape(-1).double() for m in self.managed for t in m.surrogate.params()]
        )

    @torch.no_grad()
    def _set_theta(self, theta: Tensor) -> None:
        i = 0
        for m in self.managed:
            for t, (lo, hi) in zip(m.surrogate.params(), (self.a_range, (0.0, self.lam_max))):
                k = t.numel()
                t.copy_(theta[i : i + k].clamp(lo, hi).view(t.shape).to(t.dtype))
                i += k

    def _ste_theta(self) -> Tensor:
        return torch.cat(
            [
                torch.cat([torch.ones(m.surrogate.a.numel()), torch.zeros(m.surrogate.a.numel())])
                for m in self.managed
            ]
        ).double()

    # -- the step -----------------------------------------------------------------------------

    def _probes_now(self) -> bool:
        return self.every is not None and self.steps % self.every == 0

    def _closure_reason(self) -> str:
        if self._probes_now():
            return f"to evaluate the loss at perturbed weights (step {self.steps} is a probe step, every {self.every})"
        return ""

    def _update(self, closure: Closure | None) -> Tensor | None:
        """One step; a probe step every ``every`` steps (docs/design.md §9). Returns the clean loss.
        Between probes, ``step()`` after your own ``loss.backward()`` works too."""
        t = self.steps
        if self._probes_now():
            assert closure is not None  # step() refuses a missing one (_closure_reason)
            loss = self._probe_step(closure, t)
        else:
            loss = self._evaluate(closure)
        self.optimizer.step()
        self.steps = t + 1
        return loss

    def _probe_step(self, closure: Closure, t: int) -> Tensor:
        name = type(self).__name__
        quantizers = [m.entry.quantizer for m in self.managed]
        weights = [m.entry.weight for m in self.managed]
        probe = Probe(weights)
        for q in quantizers:
            q.defer_surrogate = True  # backward leaves the raw g = ∂L/∂v̂ in v.grad
        try:
            loss = self._evaluate(closure)
        finally:
            for q in quantizers:
                q.defer_surrogate = False
        probe.clean_pass_done(self.params())
        with torch.no_grad():
            raw = [p.grad if p.grad is not None else torch.zeros_like(p) for p in weights]
            us = [m.entry.u() for m in self.managed]
            inside = [band(u, -m.entry.qn, m.entry.qp) for u, m in zip(us, self.managed)]
            kinds = [m.entry.ste_kind for m in self.managed]
            eps = [
                m.entry.scale().to(p.dtype) * SMOOTHINGS[k].eps_bar
                for m, p, k in zip(self.managed, weights, kinds)
            ]
            guides = [
                m.surrogate.psi(u, m.entry.qn, m.entry.qp).mul_(g) for m, u, g in zip(self.managed, us, raw)
            ]
            pshapes = [m.surrogate.a.shape for m in self.managed]
            F = probe_features(
                raw, guides, inside, eps, kinds, pshapes, beta=self.beta, n=self.n, seed=self.seed, step=t
            )

        with probe.passes(closure, name, self._step_modules or []) as loss_at:
            G, c = fogzo_estimate(
                weights, [g.clone() for g in guides], eps, kinds, loss_at,
                beta=self.beta, n=self.n, seed=self.seed, step=t, restore="copy",
            )  # fmt: skip
        with torch.no_grad():
            if G is None:
                self.fallbacks += 1
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"Calibrated step {t}: a probe loss was not finite (c = {c.tolist()}); kept the "
                        "surrogate gradient and skipped the fit (counted in Calibrated.fallbacks; warning once)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                for p, g in zip(weights, guides):
                    p.grad = g
                return loss
            self.normal.add(F, c)
            ref = self.theta() if self.ridge_to == "current" else self._ste_theta()
            theta = self.normal.solve(ref)
            if theta is not None:
                self._set_theta(theta)
            self.probes += 1
            self.history.append((t, self.layer_means()))
            if self.probe_update == "fogzo":
                for p, g in zip(weights, G):
                    p.grad = g
            else:
                for p, m, u, g in zip(weights, self.managed, us, raw):
                    p.grad = m.surrogate.psi(u, m.entry.qn, m.entry.qp).mul_(g)
        return loss

    def layer_means(self) -> list[tuple[float, float]]:
        """(mean a, mean λ) of every managed layer, in parameter order."""
        return [(float(m.surrogate.a.mean()), float(m.surrogate.lam.mean())) for m in self.managed]

    # -- checkpoints ---------------------------------------------------------------------------

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "probes": self.probes,
            "fallbacks": self.fallbacks,
            "normal": self.normal.state_dict(),
            "history": list(self.history),
        }

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.probes, self.fallbacks = state["steps"], state["probes"], state["fallbacks"]
        self.normal.load_state_dict(state["normal"])
        self.history = list(state["history"])

    def __repr__(self) -> str:
        return f"Calibrated(every={self.every}, n={self.n}, beta={self.beta}, {self.optimizer!r})"


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"Invalid {name}: {value!r}; it must be an int >= {low}" + (" or None" if allow_none else "")
        )
