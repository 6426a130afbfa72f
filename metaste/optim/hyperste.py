"""HyperSTE: learn the surrogate gradient ψ(u; θ) by hypergradients while training (SPEC §3)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence, Sized
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ..quant.registry import lookup
from ..quant.surrogates import BOUNDARIES
from ._wrapper import Closure, OptimizerWrapper
from .hyper._common import HyperMethod, HyperOptions, ManagedWeight, surrogate_stats
from .hyper.analytical import REGIONS, Analytical
from .hyper.delayed import Delayed
from .hyper.horizon import FAGU, LGATT, PFAGU, Horizon, horizon_options

__all__ = ["HyperSTE"]


class HyperSTE(OptimizerWrapper):
    r"""Train the learnable surrogates (SLSTE / PLSTE / DLSTE) of a quantized model by hypergradients.

    Example::

        model = metaste.quantize_model(net, bits=2, surrogate="slste")
        opt = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="analytical")
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))   # the wrapper runs backward
        opt.diagnostics["layers"]["conv1.weight"]["mean"]             # learned a, per layer

    Algorithm (SPEC §3; θ = surrogate parameters, g_t = ∂L_t/∂v̂_t)::

        for every step t:
            L_t = closure(); L_t.backward()      # managed weights get the raw g_t: their
                                                 # quantizers defer ψ to the wrapper
            method.before_update(t)              # θ update (analytical) / hypergradient (delayed),
                                                 # then p.grad = g_t ⊙ ψ(u_t; θ)
            optimizer.step()                     # the base optimizer, untouched
            method.after_update(t)               # delayed: θ update at the end of a window
            return L_t

    Applying ψ after backward (quantizer ``defer_surrogate=True``) means the rule sees the
    *complete* gradient: summed over the micro-batches of a closure that returns their mean loss,
    all-reduced across ranks by DDP. Every rank therefore computes the same θ, equal to a
    single-process run on the concatenated batch (SPEC §3.1).

    Methods:

    * ``"analytical"`` (SPEC §3.1, thesis 4.3): the self-consistent per-element update
      a' = a + η_a·c·ψ(u_t; a'), c = η_w·g_t·g_{t−1}·∂ψ(u_{t−1}; a)/∂a, one forward+backward per
      step. Needs ``torch.optim.SGD`` without momentum/nesterov/maximize (weight decay is fine)
      and SLSTE with ``granularity="element"``. η_w is the lr the previous update actually used,
      so LR schedulers work. With a fixed step s and the clipped STE, a clipped element gets no
      gradient and stays clipped; the same holds for an element whose a reached ``a_min``.
    * ``"delayed"`` (SPEC §3.2, thesis A.2): θ frozen over windows of ``window`` steps; the
      one-step hypergradient of the first pair (or of all within-window pairs) is applied at the
      next window by ``hyper_optimizer``. Any torch.optim optimizer (its ``differentiable=True``
      mode, :mod:`metaste.optim.diffopt`), any learnable surrogate and granularity.
    * ``"fagu"`` / ``"pfagu"`` / ``"lgatt"`` (SPEC §3.3–3.4, thesis 4.4–4.5, FAGU / P-FAGU /
      FLAGU): θ follows a schedule over a horizon of T steps that is learned by K replays of the
      horizon from a snapshot, then a final pass with the learned schedule
      (:mod:`metaste.optim.hyper.horizon`). The user's ``step`` loop is unchanged: its pass is
      replay 0 and returns θ^0's losses; closures must be re-callable (they capture their batch);
      the horizon's last ``step`` runs the other replays and the final pass and returns with the
      final-pass weights. :meth:`run_horizon` takes a list of closures instead.

    The learning rate of θ (``hyper_lr``):

    * ``hyper_lr_mode="normalized"`` (default): η_a = ``hyper_lr`` / RMS of the hypergradient
      (a bias-corrected running mean square over its entries, factor ``normalize_beta``, per
      surrogate tensor). ``hyper_lr=0.01`` means "a moves by about 1 % per update"
      (analytical: the relative step x = η_a·c has RMS ≈ 0.01; delayed: the step η_a·h has RMS ≈
      0.01 with a ≈ 1), independent of the model, the loss scale and the weight lr.
    * ``hyper_lr_mode="raw"``: η_a = ``hyper_lr`` as in the thesis. c is a product of two
      gradients and a learning rate (≈ 1e−7 per element on a small MLP), so a raw η_a that does
      anything is 1e4 or more and changes with the model.

    ``hyper_lr=0`` leaves θ unchanged and the run bit-identical to the bare optimizer.
    ``state_dict()`` holds the base optimizer's state, the history (analytical) or the pending
    window (delayed) and the hyper-optimizer; with the model's ``state_dict`` (which holds θ as
    buffers) a resumed run continues bitwise, also in the middle of a window.

    While a HyperSTE manages a weight, ``loss.backward()`` leaves the raw ∂L/∂v̂ in its ``.grad``;
    call :meth:`release` before training the model with another optimizer.

    Args:
        optimizer: the base optimizer over the model's parameters. The managed weights are its
            parameters that are quantized (registry, SPEC §1) with a learnable surrogate.
        method: ``"analytical"`` (default) or ``"delayed"``; more in :attr:`METHODS`.
        hyper_lr: learning rate of θ (default 0.01), ≥ 0; see above.
        hyper_lr_mode: ``"normalized"`` (default) or ``"raw"``.
        normalize_beta: EMA factor of the normalisation (default 0.99), in [0, 1).
        hyper_optimizer: delayed only: a ``torch.optim.Optimizer`` class (or a callable
            ``(params, lr=..., **kwargs)``) for θ, built over leaf copies of the surrogate
            parameters with ``lr=hyper_lr``. Default ``None``: plain SGD, θ ← θ − η_a·h
            (thesis A.1). Its state is in ``state_dict()``.
        hyper_optimizer_kwargs: extra arguments of ``hyper_optimizer`` (default none).
        window: delayed only: k ≥ 2 steps per window (default 2).
        accumulate: delayed only: ``"first"`` (default, the thesis: the first pair of each
            window), ``"sum"`` or ``"mean"`` over the k−1 within-window pairs.
        boundary: SLSTE's ∂ψ/∂a mode set on every managed surrogate: ``"none"`` or
            ``"window"`` (SPEC §2). Default ``None``: ``"window"`` for analytical (the thesis's
            b = ½), ``"none"`` for delayed (what autograd differentiates).
        boundary_width: b of the window mode (default 0.5).
        resolve: analytical only: ``"halve"`` (default), ``"threshold"`` or ``"passive"``
            (SPEC §3.1; :func:`~metaste.optim.hyper.analytical.analytical_update`).
        max_halvings: analytical ``"halve"``: past this many halvings of η_a a gap element is
            not updated (default 30).
        model: names the layers in :attr:`diagnostics` (default: ``"w0"``, ...); required by the
            horizon methods, whose snapshot holds its buffers (BN running statistics).

    Horizon methods only (:func:`~metaste.optim.hyper.horizon.horizon_options`; ``None`` = default):
        horizon: T, the horizon in steps; or ``horizon_epochs=E`` with ``steps_per_epoch`` (an int
            or a data loader: its ``len()``).
        replays: K replays (θ updates) per horizon (default 50 for fagu/lgatt, 5 for pfagu).
        schedule: ``"per_step"`` (one θ per step, the thesis's ATT; default for fagu/lgatt) or
            ``"shared"`` (one per horizon; default for pfagu).
        last: the last step's rule, ``"carry"`` | ``"ste"`` | ``"extra_carry"`` | ``"extra_ste"``
            (default ``"carry"`` for T ≥ 2, ``"extra_ste"`` for T = 1; SPEC §3.3).
        warm_start: start each horizon from the previous one's learned schedule (default True)
            or from the initial values.
        final_pass: after the K replays, run the horizon once more with θ^K and keep it (default
            True); False keeps the weights of replay K−1.
        memory_budget: bytes a horizon may keep alive (recorded batches, schedule, snapshot,
            lgatt's trace), estimated up front; above it the first step raises
            ``HorizonMemoryError`` (default: half the physical memory).
        hessian: lgatt only: ``"exact"`` (default; a reverse sweep, one HVP per step) or
            ``"diag"`` (the thesis's element-wise approximation, SGD without momentum).
        recalibrate: ``recalibrate(model)`` called at the start of every horizon, before the
            snapshot, e.g. ``lambda m: metaste.recalibrate_bn(m, batches)`` (thesis 5.1).
        seed: seeds lgatt's diag probes (default 0).
    """

    METHODS: dict[str, type[HyperMethod]] = {
        "analytical": Analytical,
        "delayed": Delayed,
        "fagu": FAGU,
        "pfagu": PFAGU,
        "lgatt": LGATT,
    }

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        method: str = "analytical",
        hyper_lr: float = 0.01,
        hyper_lr_mode: str = "normalized",
        normalize_beta: float = 0.99,
        hyper_optimizer: Any = None,
        hyper_optimizer_kwargs: dict | None = None,
        window: int = 2,
        accumulate: str = "first",
        boundary: str | None = None,
        boundary_width: float = 0.5,
        resolve: str = "halve",
        max_halvings: int = 30,
        model: nn.Module | None = None,
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
    ) -> None:
        super().__init__(optimizer)
        if method not in self.METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {tuple(self.METHODS)}")
        if not isinstance(hyper_lr, numbers.Real) or not math.isfinite(hyper_lr) or hyper_lr < 0:
            raise ValueError(f"Invalid hyper_lr: {hyper_lr!r}; it must be a finite number >= 0 (0 freezes θ)")
        if hyper_lr_mode not in ("normalized", "raw"):
            raise ValueError(f"Invalid hyper_lr_mode: {hyper_lr_mode!r}; choose 'normalized' or 'raw'")
        if not 0 <= normalize_beta < 1:
            raise ValueError(f"Invalid normalize_beta: {normalize_beta}; it must be in [0, 1)")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(
                f"Invalid window: {window!r}; delayed updates need an int >= 2 (θ must stay frozen "
                "for at least one pair of steps)"
            )
        if accumulate not in ("first", "sum", "mean"):
            raise ValueError(f"Invalid accumulate: {accumulate!r}; choose 'first', 'sum' or 'mean'")
        if boundary is not None and boundary not in BOUNDARIES:
            raise ValueError(f"Invalid boundary: {boundary!r}; choose one of {BOUNDARIES} or None")
        if not boundary_width > 0:
            raise ValueError(f"Invalid boundary_width: {boundary_width}; it must be > 0")
        if resolve not in ("halve", "threshold", "passive"):
            raise ValueError(f"Invalid resolve: {resolve!r}; choose 'halve', 'threshold' or 'passive'")
        if isinstance(max_halvings, bool) or not isinstance(max_halvings, int) or max_halvings < 0:
            raise ValueError(f"Invalid max_halvings: {max_halvings!r}; it must be an int >= 0")
        if method == "analytical" and hyper_optimizer is not None:
            raise ValueError(
                "hyper_optimizer applies to method='delayed' only: the analytical update is its own "
                "(SGD-derived) rule"
            )
        hopts = horizon_options(
            method,
            optimizer,
            model,
            boundary,
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
        )
        opts = HyperOptions(
            float(hyper_lr),
            hyper_lr_mode,
            float(normalize_beta),
            hyper_optimizer,
            dict(hyper_optimizer_kwargs or {}),
            window,
            accumulate,
            resolve,
            max_halvings,
        )
        managed = self._find_managed(model)
        cls = self.METHODS[method]
        cls.check(optimizer, managed, opts)
        # validation is over: from here on the model is changed
        for mw in managed:
            mw.surrogate.boundary = boundary or cls.default_boundary
            mw.surrogate.b = float(boundary_width)
            mw.quantizer.defer_surrogate = True
        self.method_name = method
        self.managed = managed
        self.method = (
            cls(optimizer, managed, opts, hopts, model)
            if issubclass(cls, Horizon)
            else cls(optimizer, managed, opts)
        )
        self.steps = 0

    def _find_managed(self, model: nn.Module | None) -> list[ManagedWeight]:
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        managed, seen = [], set()
        for k, p in enumerate(self.params()):
            entry = lookup(p)
            if entry is None or id(p) in seen or not getattr(entry.surrogate, "learnable", False):
                continue
            seen.add(id(p))
            if entry.quantizer.defer_surrogate:
                raise ValueError(
                    f"weight {names.get(id(p), f'w{k}')!r} is already managed by another HyperSTE; "
                    "call .release() on that one first"
                )
            managed.append(ManagedWeight(p, entry.quantizer, names.get(id(p), f"w{k}")))
        if not managed:
            raise ValueError(
                "HyperSTE found no quantized weight with a learnable surrogate among the optimizer's "
                "parameters; quantize the model with one, e.g. "
                "metaste.quantize_model(model, bits=2, surrogate='slste'), and build the optimizer "
                "over the quantized model's parameters"
            )
        return managed

    def release(self) -> None:
        """Hand ψ back to the quantizers' backward (undo ``defer_surrogate``). Call it before
        training the model without this wrapper; the wrapper must not be stepped afterwards."""
        for mw in self.managed:
            mw.quantizer.defer_surrogate = False

    def step(self, closure: Closure | None = None):  # type: ignore[override]
        """One step (see the class docstring); returns the closure's loss, detached."""
        if isinstance(self.method, Horizon):  # replays and the final pass run inside (SPEC §3.3)
            loss = self.method.step(closure, self._evaluate)
            self.steps += 1
            return loss
        loss = self._evaluate(closure)
        self.method.before_update(self.steps)
        self.optimizer.step()
        self.method.after_update(self.steps)
        self.steps += 1
        return loss

    def run_horizon(self, closures: Sequence[Closure], extra: Closure | None = None) -> list[Tensor]:
        """Horizon methods: one whole horizon over ``closures`` (T re-callable closures), as T
        ``step`` calls; returns the user-pass (θ^0) losses. ``extra``: the batch of L_T for the
        ``extra_*`` last-step rules (default: the first closure)."""
        if not isinstance(self.method, Horizon):
            raise ValueError(f"run_horizon() is for the horizon methods, not method={self.method_name!r}")
        losses = self.method.run_horizon(closures, self._evaluate, extra)
        self.steps += len(losses)
        return losses

    def resume_horizon(self, closures: Sequence[Closure]) -> None:
        """Horizon methods, after ``load_state_dict`` in the middle of a horizon: the closures of
        the steps it had already run (bound to the new model), so that its replays can rerun them."""
        if not isinstance(self.method, Horizon):
            raise ValueError(f"resume_horizon() is for the horizon methods, not method={self.method_name!r}")
        self.method.resume_horizon(closures)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """Surrogate health after the last step (SPEC §3.5).

        ``{"step", "method", "hypergrad_norm", "layers": {name: {...}}, "branch_fractions"}``;
        per layer and per surrogate parameter (``a``; ``a_n``/``a_p`` for DLSTE: keys prefixed
        ``"a_n."``/``"a_p."``): mean, min, max, q05..q95, histogram over [a_min, a_max],
        ``frac_at_min``/``frac_at_max`` (an element at a_min has ψ ≈ 0 and stops learning), plus
        the last step's ``clipped_frac`` (ψ = 0) and, for analytical, the region fractions
        (summing to 1), ``halvings`` (total), ``halved_frac``, ``unresolved_frac``.
        ``branch_fractions`` aggregates the regions over all elements (analytical only);
        ``skipped_windows`` counts non-finite hypergradients (delayed).
        """
        layers: dict[str, dict[str, Any]] = {}
        for mw in self.managed:
            s = mw.surrogate
            d: dict[str, Any] = {}
            for pname, t in zip(s.param_names, s.params()):
                st = surrogate_stats(t, s.a_min, s.a_max)
                d.update(st if pname == "a" else {f"{pname}.{k}": v for k, v in st.items()})
            d.update(self.method.step_stats.get(mw.name, {}))
            layers[mw.name] = d
        out: dict[str, Any] = {
            "step": self.steps,
            "method": self.method_name,
            "hypergrad_norm": self.method.hypergrad_norm,
            "layers": layers,
        }
        if self.method_name == "analytical":
            sizes = {mw.name: mw.param.numel() for mw in self.managed if mw.name in self.method.step_stats}
            total = sum(sizes.values()) or 1
            out["branch_fractions"] = {
                r: sum(self.method.step_stats[n][r] * sz for n, sz in sizes.items()) / total for r in REGIONS
            }
        if self.method_name == "delayed":
            out["skipped_windows"] = self.method.skipped
        if isinstance(self.method, Horizon):
            out["horizon"] = self.method.horizon_stats()
        return out

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {"method_name": self.method_name, "steps": self.steps, "method": self.method.state_dict()}

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        if state["method_name"] != self.method_name:
            raise ValueError(
                f"state_dict was saved by HyperSTE(method={state['method_name']!r}); this one runs "
                f"method={self.method_name!r}"
            )
        self.steps = state["steps"]
        self.method.load_state_dict(state["method"])
