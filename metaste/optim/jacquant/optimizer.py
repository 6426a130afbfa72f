"""JacQuant: a learned group-wise Jacobian slope in place of the STE's mask (docs/design.md §8).

The forward quantizer is unchanged. The STE's ∂v̂/∂v = in becomes b = clip(α_g + γ_g·φ, b_min, b_max)·in
with φ = 2|u − round(u)|, two numbers per group of G input elements. :func:`fit_slope` is the fit
(a 2×2 ridge least squares of code changes on (α + γφ)·η, weighted by the layer input's second
moment); :class:`JacQuant` applies b after backward (the quantizers defer ψ), refits every K steps,
ends a code-preserving phase when too many codes flip, and optionally runs STORM variance
reduction with the closure at the previous iterate (reset at each phase boundary).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ...quant.psi import band
from ...quant.quantizers import LSQQuantizer
from ...quant.registry import QuantEntry, claim_all, lookup, release
from ..core.closure import Closure, closure_value
from ..core.noise import derive_seed
from ..core.wrapper import OptimizerWrapper, check_quantized_dtypes
from . import passes

__all__ = ["JacQuant", "fit_slope", "slope_phi", "FITS", "VRS"]

FITS = ("dither", "probe")
VRS = ("none", "storm")


def slope_phi(u: Tensor) -> Tensor:
    """φ = 2|u − round(u)|: 0 at a bin centre, 1 at a boundary."""
    return (u - torch.round(u)).abs_().mul_(2)


def _grouped(x: Tensor, group: int) -> Tensor:
    """(out, in) → (out, in/G, G); a conv weight is flattened to (out, in·kh·kw) first."""
    flat = x.reshape(x.shape[0], -1)
    return flat.view(flat.shape[0], flat.shape[1] // group, group)


def fit_slope(
    u: Tensor,
    qn: float,
    qp: float,
    group: int,
    *,
    fit: str = "dither",
    eps: float = 0.5,
    weight: Tensor | None = None,
    ridge: float = 1e-3,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """(α, γ) per group of ``group`` input elements (shapes (out, in/G)), docs/design.md §8.

    Code-unit perturbations η (``"probe"``: ±ε; ``"dither"``: U(−ε, ε)), Δ = c(u + η) − c(u) with
    c = clamp(round(·), −Qn, Qp); per group the weighted ridge least squares of Δ on
    [η, φη] over the in-range elements, weights ``weight`` (broadcast against the weight flattened
    to (out, in·kh·kw): shape (in·kh·kw,) per input column — the layer input's second moment — or
    (out, in·kh·kw)), ridge ``ridge``·tr toward the STE (1, 0). An element of weight 0 does not
    enter the fit; a group whose weights are all 0 gets (1, 0).
    """
    gen = torch.Generator(device=u.device).manual_seed(derive_seed(seed, 7))
    r = torch.rand(u.shape, generator=gen, device=u.device, dtype=torch.float64)
    u64 = u.detach().reshape(u.shape[0], -1).to(torch.float64)
    r = r.view(u64.shape)  # a conv weight (out, in, kh, kw) flattened as u is: same draws, same order
    eta = (torch.where(r < 0.5, -eps, eps) if fit == "probe" else (2 * r - 1) * eps).to(torch.float64)
    c0 = torch.round(u64).clamp(-qn, qp)
    delta = torch.round(u64 + eta).clamp(-qn, qp) - c0
    inside = band(u64, -qn, qp)
    w = inside if weight is None else inside * weight.to(torch.float64)
    phi = slope_phi(u64)
    x1, x2 = _grouped(eta, group), _grouped(phi * eta, group)
    wg, dg = _grouped(w.expand_as(u64), group), _grouped(delta, group)
    a11, a12, a22 = (wg * x1 * x1).sum(-1), (wg * x1 * x2).sum(-1), (wg * x2 * x2).sum(-1)
    b1, b2 = (wg * x1 * dg).sum(-1), (wg * x2 * dg).sum(-1)
    mu = ridge * (a11 + a22) + 1e-30
    a11, a22, b1 = a11 + mu, a22 + mu, b1 + mu  # ridge toward (α, γ) = (1, 0)
    det = a11 * a22 - a12 * a12
    return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


class JacQuant(OptimizerWrapper):
    r"""JacQuant on any base optimizer (docs/design.md §8).

    Example::

        model = metaste.quantize_model(net, bits=2, quantizer="lsq")
        opt = metaste.JacQuant(torch.optim.Adam(model.parameters(), lr=1e-3), vr="none")
        loss = opt.step(lambda: F.cross_entropy(model(x), y))   # x, y fixed inside the closure

    Args:
        group (int, default 128): G, input elements per (α, γ); a weight whose input dimension
            G does not divide falls back to one group per row (warning).
        every (int, default 50): K, steps between refits.
        fit (``"dither"`` | ``"probe"``), eps (default ½): the perturbations of the fit.
        b_range (default (0, 4)): the clip of α + γφ.
        ema (float in [0, 1), default 0.9): EMA over fits, and of the layer input's second moment
            per weight column (recorded in every training forward; the fit's weights).
        vr (``"none"`` | ``"storm"``), storm_a (float in (0, 1], default 0.1): STORM's a; needs
            a closure that can be evaluated again at the previous weights on the same batch.
        flip_rate (default 1e−4): a step whose per-tensor code-flip rate exceeds it ends a
            code-preserving phase: the STORM state resets (b is refitted on the K-step schedule
            only, docs/design.md §8).
        grad_scaler, max_grad_norm: fp16 loss scaling and gradient clipping, as in
            :class:`~metaste.FOGZO` (docs/design.md §5.1); not with ``vr="storm"``, whose second
            backward in a step a scaler cannot unscale.
    """

    SETTINGS = ("vr", "storm_a", "flip_rate", "seed")

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        group: int = 128,
        every: int = 50,
        fit: str = "dither",
        eps: float = 0.5,
        b_range: tuple[float, float] = (0.0, 4.0),
        ema: float = 0.9,
        vr: str = "none",
        storm_a: float = 0.1,
        flip_rate: float = 1e-4,
        seed: int = 0,
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
    ) -> None:
        for name, v in (("group", group), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name}: {v!r}; it must be an int >= 1")
        if fit not in FITS:
            raise ValueError(f"Invalid fit: {fit!r}; choose one of {FITS}")
        if not 0 < eps < math.inf:
            raise ValueError(f"Invalid eps: {eps}; it must be finite and > 0 (code units)")
        if not 0.0 <= b_range[0] <= 1.0 <= b_range[1] < math.inf:
            raise ValueError(f"Invalid b_range: {b_range}; need 0 <= b_min <= 1 <= b_max < inf")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"Invalid ema: {ema}; it must lie in [0, 1)")
        if vr not in VRS:
            raise ValueError(f"Invalid vr: {vr!r}; choose one of {VRS}")
        if not 0.0 < storm_a <= 1.0:
            raise ValueError(f"Invalid storm_a: {storm_a}; it must lie in (0, 1]")
        if not 0.0 <= flip_rate <= 1.0:
            raise ValueError(f"Invalid flip_rate: {flip_rate}; it must lie in [0, 1]")
        super().__init__(optimizer, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        check_quantized_dtypes(self.params(), "JacQuant")
        self.every, self.fit, self.eps, self.b_range, self.ema = every, fit, float(eps), b_range, float(ema)
        self.vr, self.storm_a, self.flip_rate, self.seed = vr, float(storm_a), float(flip_rate), seed
        self.managed: list[QuantEntry] = []
        self.groups: list[int] = []
        for p in self.params():
            e = lookup(p)
            if e is None or not p.requires_grad or e.weight.dim() < 2 or not hasattr(e.quantizer, "s"):
                continue
            cols = e.weight[0].numel()
            g = group if cols % group == 0 else cols
            if g != group:
                warnings.warn(
                    f"JacQuant: group size {group} does not divide the input dimension {cols} of a weight "
                    f"of shape {tuple(e.weight.shape)}; that weight uses one group per output row",
                    stacklevel=2,
                )
            self.managed.append(e)
            self.groups.append(g)
        if not self.managed:
            raise ValueError(
                "JacQuant found no quantized (fixed or LSQ) weight among the optimizer's parameters"
            )
        claim_all([e.quantizer for e in self.managed], "gradient", self)  # no other wrapper's ψ on them
        for e in self.managed:
            e.quantizer.defer_surrogate = True  # backward leaves g = ∂L/∂v̂; b is applied in step
            e.quantizer.input_moment_ema, e.quantizer.input_moment = self.ema, None  # the fit's weights
        self.alpha = [
            torch.ones(e.weight.shape[0], e.weight[0].numel() // g) for e, g in zip(self.managed, self.groups)
        ]
        self.gamma = [torch.zeros_like(a) for a in self.alpha]
        self.steps, self.fits, self.phases = 0, 0, 0
        self._codes: list[Tensor] | None = None
        self._prev: list[Tensor] | None = None  # STORM: x_{t−1} (all parameters) and d_{t−1}
        self._d: list[Tensor | None] | None = None
        self._checked = False

    _release_call = "close"

    def close(self) -> None:
        """Hand the quantizers back (ψ applied in their backward again, no moment recorded); this
        wrapper cannot step any more."""
        for e in self.managed:
            release(e.quantizer, "gradient", self)
            e.quantizer.defer_surrogate = False
            e.quantizer.input_moment_ema, e.quantizer.input_moment = None, None
            e.quantizer.input_moment_pending = None
        self.released = True

    @contextlib.contextmanager
    def _recording(self, on: bool) -> Iterator[None]:
        """Record the input moment in the forwards inside (on) or not (STORM's extra passes)."""
        for e in self.managed:
            e.quantizer.input_moment_ema = self.ema if on else None
        try:
            yield
        finally:
            for e in self.managed:
                e.quantizer.input_moment_ema = self.ema

    def slopes(self, k: int, u: Tensor | None = None) -> Tensor:
        """b of managed weight k (its shape), at ``u`` (default: the weight's current u)."""
        return self._slopes(k, self.managed[k].u() if u is None else u)[0]

    @torch.no_grad()
    def _slopes(self, k: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(b, in, c) of managed weight k at ``u``, each of the weight's shape
        (:func:`~.passes.slopes`)."""
        e = self.managed[k]
        out = passes.slopes(
            _grouped(u, self.groups[k]),
            self.gamma[k].unsqueeze(-1),
            self.alpha[k].unsqueeze(-1),
            e.qn,
            e.qp,
            self.b_range,
        )
        return tuple(t.view(u.shape) for t in out)  # type: ignore[return-value]

    @torch.no_grad()
    def refit(self, us: list[Tensor] | None = None) -> None:
        """Refit (α, γ) of every managed weight at ``us`` (default: the current u), weighted by the
        recorded input moment, and fold the fit into the EMA."""
        for k, (e, g) in enumerate(zip(self.managed, self.groups)):
            a, c = fit_slope(
                e.u() if us is None else us[k],
                e.qn,
                e.qp,
                g,
                fit=self.fit,
                eps=self.eps,
                weight=e.quantizer.input_moment,
                seed=self.seed + self.fits,
            )
            w = self.ema if self.fits else 0.0
            self.alpha[k] = w * self.alpha[k] + (1 - w) * a.float()
            self.gamma[k] = w * self.gamma[k] + (1 - w) * c.float()
        self.fits += 1

    @torch.no_grad()
    def _apply_slopes(self, us: list[Tensor], track_codes: bool = False) -> list[Tensor]:
        """g ← b⊙g (and LSQ's ∂L/∂s corrected) for every managed weight at ``us``, in one pass per
        weight (:func:`~.passes.step_slopes`). ``track_codes``: the pass also gives the
        codes, returned, and a step whose codes flip more than ``flip_rate`` since the last ends a
        phase."""
        codes, flips = [], []
        for k, (e, u) in enumerate(zip(self.managed, us)):
            grad, q, g = e.weight.grad, e.quantizer, self.groups[k]
            correct_s = grad is not None and isinstance(q, LSQQuantizer) and q.s.grad is not None
            g3 = None if grad is None else _grouped(grad if grad.is_contiguous() else grad.contiguous(), g)
            last = None if self._codes is None or not track_codes else _grouped(self._codes[k], g)
            c, n, corr = passes.step_slopes(
                _grouped(u, g),
                self.gamma[k].unsqueeze(-1),
                self.alpha[k].unsqueeze(-1),
                e.qn,
                e.qp,
                self.b_range,
                g3,
                correct_s,
                torch.int8 if q.bits <= 8 else torch.int32,
                last,
            )
            if grad is not None and not grad.is_contiguous():
                grad.copy_(g3.view(grad.shape))
            if corr is not None:  # ∂L/∂s = Σ g(c − b·u): add Σ g·u·(in − b)
                q.s.grad.add_(corr.view(u.shape).sum_to_size(q.s.shape) * q.grad_scale)
            codes.append(c.view(u.shape))
            flips.append(n)
        if track_codes and self._codes is not None:  # one host sync for all tensors
            counts = torch.stack(flips).tolist()
            if any(f > self.flip_rate * c.numel() for f, c in zip(counts, codes)):
                self.phases += 1
                self._d = None
        return codes

    def _grads(self, closure: Closure) -> Tensor:
        """Gradients with the slopes at the weights as they are (STORM's pass at x_{t−1}, which
        records no input moment)."""
        with self._recording(False):
            loss = self._evaluate(closure)
        self._apply_slopes([e.u() for e in self.managed])
        return loss

    def _closure_reason(self) -> str:
        if self.vr == "storm":
            return "to evaluate the batch again at the previous weights (vr='storm')"
        return ""

    def _before_step(self) -> None:
        if self.vr == "storm" and self._active_scaler() is not None:
            raise ValueError(
                "JacQuant(vr='storm') runs two backward passes per step (STORM's pass at the previous "
                "weights), and a GradScaler unscales the gradients once per step: train it in bf16 or "
                "float32, or use vr='none' with the scaler"
            )

    def _extra_state(self) -> Callable[[], None]:
        """The input-moment statistics: put back after a failed step, and the moments recorded
        for it (by the closure or by your own forward before ``step()``) dropped."""
        moments = [
            None if e.quantizer.input_moment is None else e.quantizer.input_moment.clone()
            for e in self.managed
        ]

        def restore() -> None:
            for e, m in zip(self.managed, moments):
                e.quantizer.input_moment, e.quantizer.input_moment_pending = m, None

        return restore

    def _update(self, closure: Closure | None) -> Tensor | None:
        """One step; returns the closure's loss. If the closure raises or returns a non-finite
        loss, the weights, optimizer state, BatchNorm statistics and the input-moment statistics
        the forward records are as they were."""
        params = [p for p in self.params() if p.requires_grad]
        if self.vr == "storm" and not self._checked:
            try:
                with torch.no_grad(), self._recording(False):
                    l1, l2 = closure_value(closure, "JacQuant"), closure_value(closure, "JacQuant")
            except RuntimeError as error:  # backward under no_grad: a torch-style closure
                if "does not require grad" in str(error):
                    self._check_torch_closure("JacQuant", False)
                raise
            if l1 != l2:
                raise ValueError(
                    f"JacQuant(vr='storm') evaluates the closure again at the previous weights on the same batch, "
                    f"but two calls at the same weights returned {l1} and {l2}: the closure draws a new batch "
                    "(or dropout) per call. Capture the batch in the closure, or use vr='none'"
                )
            self._checked = True
        # the weights do not move until the base step: one u per weight serves the flip check, the
        # refit and the slopes, all after the closure (whose forward records the input moment)
        loss = self._evaluate(closure)
        for e in self.managed:  # this step's forwards (micro-batches) move the EMA once
            e.quantizer.fold_input_moment()
        us = [e.u() for e in self.managed]
        if self.steps % self.every == 0:
            self.refit(us)
        self._codes = self._apply_slopes(us, track_codes=True)
        if self.vr == "storm":
            g_now = [p.grad.clone() if p.grad is not None else None for p in params]
            if self._d is not None and self.storm_a < 1.0:
                current = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, x in zip(params, self._prev):
                        p.copy_(x)
                self._grads(closure)
                g_prev = [p.grad for p in params]
                with torch.no_grad():
                    for p, x in zip(params, current):
                        p.copy_(x)
                for p, g, d, gp in zip(params, g_now, self._d, g_prev):
                    if g is None:
                        p.grad = None
                        continue
                    p.grad = g + (1 - self.storm_a) * (d - gp) if d is not None and gp is not None else g
            else:
                for p, g in zip(params, g_now):
                    p.grad = g
            self._d = [p.grad.clone() if p.grad is not None else None for p in params]
            self._prev = [p.detach().clone() for p in params]
        self.optimizer.step()
        self.steps += 1
        return loss

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "fits": self.fits,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "moments": [e.quantizer.input_moment for e in self.managed],
        }

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.fits = state["steps"], state["fits"]
        self.alpha, self.gamma = list(state["alpha"]), list(state["gamma"])
        for e, m in zip(self.managed, state.get("moments", [None] * len(self.managed))):
            e.quantizer.input_moment = None if m is None else m.clone()
