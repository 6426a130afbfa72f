"""HyperSTE: learn the surrogate gradient ψ(u; θ) by hypergradients while training
(docs/design.md §3). The wrapper finds the managed weights and dispatches to a method object
(:mod:`metaste.optim.hyper`): it runs the step protocol, and answers diagnostics and state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ...quant.registry import claim_all, foreign_libraries, lookup, release
from ..core.closure import Closure
from ..core.fsdp import gather, is_dtensor, shard_group, shard_rows_like
from ..core.wrapper import OptimizerWrapper, check_latent_dtype
from ._common import ManagedWeight, surrogate_stats
from ._options import MethodOptions
from .horizon_options import HorizonOptions
from .methods import METHODS

__all__ = ["HyperSTE"]


class HyperSTE(OptimizerWrapper):
    r"""Train the learnable surrogates (SLSTE / PLSTE / DLSTE) of a quantized model by hypergradients.

    Example::

        model = metaste.quantize_model(net, bits=2, surrogate="slste")
        opt = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="analytical")
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))   # the wrapper runs backward
        opt.diagnostics["layers"]["conv1.weight"]["mean"]             # learned a, per layer

    Algorithm (docs/design.md §3; θ = surrogate parameters, g_t = ∂L_t/∂v̂_t)::

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
    single-process run on the concatenated batch (docs/design.md §3.1).

    FSDP2 (``metaste.optim.fully_shard``, docs/design.md §10.4): ``"analytical"`` and
    ``"delayed"`` run on the sharded weights, each rank on its rows; a per-element or per-channel
    θ is sharded with its weight (a DTensor buffer with the weight's placement, so the model's
    ``state_dict`` holds it as it holds the weights), a per-tensor θ is whole on every rank; the
    sums over θ are reduced over the mesh, so the run equals one process on the whole batch.
    ``diagnostics["layers"]``' statistics of θ's values are of the rank's rows; ``release()``
    gathers θ (call it on every rank). The horizon methods raise ``NotImplementedError``.

    Methods:

    * ``"analytical"`` (docs/design.md §3.1, thesis 4.3): the self-consistent per-element update
      a' = a + η_a·c·ψ(u_t; a'), c = η_w·g_t·g_{t−1}·∂ψ(u_{t−1}; a)/∂a, one forward+backward per
      step. Needs ``torch.optim.SGD`` without momentum/nesterov/maximize (weight decay is fine)
      and SLSTE with ``granularity="element"``. η_w is the lr the previous update actually used,
      so LR schedulers work. With a fixed step s and the clipped STE, a clipped element gets no
      gradient and stays clipped; the same holds for an element whose a reached ``a_min``.
    * ``"delayed"`` (docs/design.md §3.2, thesis A.2): θ frozen over windows of ``window`` steps; the
      one-step hypergradient of the first pair (or of all within-window pairs) is applied at the
      next window by ``hyper_optimizer``. Any torch.optim optimizer (its ``differentiable=True``
      mode, :mod:`metaste.optim.hyper.diffopt`), any learnable surrogate and granularity.
    * ``"fagu"`` / ``"pfagu"`` / ``"lgatt"`` (docs/design.md §3.3–3.4, thesis 4.4–4.5, FAGU / P-FAGU /
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
            parameters that are quantized (registry, docs/design.md §1) with a learnable surrogate.
        method: an options object — :class:`~metaste.optim.hyper.Analytical` (default),
            :class:`~metaste.optim.hyper.Delayed`, :class:`~metaste.optim.hyper.FAGU`,
            :class:`~metaste.optim.hyper.PFAGU`, :class:`~metaste.optim.hyper.LGATT` — or its name
            with the options as keywords (``method="delayed", window=3`` is
            ``method=Delayed(window=3)``). A keyword the method does not use raises ``TypeError``
            naming the method and its options. Common to all: ``hyper_lr`` (0.01),
            ``hyper_lr_mode`` (``"normalized"``), ``normalize_beta`` (0.99), ``boundary``
            (SLSTE's ∂ψ/∂a mode: ``None`` = the method's default, ``"window"`` for analytical,
            ``"none"`` otherwise), ``boundary_width`` (0.5); the others are documented on each
            options class.
        model: names the layers in :attr:`diagnostics` (default: ``"w0"``, ...); required by the
            horizon methods, whose snapshot holds its buffers (BN running statistics).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 (per-step methods): backward on the
            scaled loss, unscale before the hypergradients, an inf/NaN gradient skips the step and
            leaves θ and the method's state untouched, then ``scaler.update()`` (docs/design.md §5.1).
        max_grad_norm: clip g ⊙ ψ (and the other gradients) right before the base step; the
            hypergradients see the unclipped update (exact whenever the clip does not act).
        **options: the method's options, when ``method`` is a name.
    """

    METHODS: dict[str, type[MethodOptions]] = METHODS

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        method: str | MethodOptions = "analytical",
        model: nn.Module | None = None,
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(optimizer, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        if isinstance(method, MethodOptions):
            if options:
                raise TypeError(
                    f"HyperSTE got a {type(method).__name__} options object and the keywords "
                    f"{sorted(options)}; put them in the options object"
                )
            opts = method
        elif isinstance(method, str) and method in self.METHODS:
            opts = self.METHODS[method].from_kwargs(**options)
        else:
            raise ValueError(
                f"Unknown method {method!r}; choose one of {tuple(self.METHODS)} or pass an options "
                "object such as metaste.optim.hyper.Delayed(window=3)"
            )
        managed = self._find_managed(model)
        sharded = [mw for mw in managed if is_dtensor(mw.param)]
        for mw in sharded:
            shard_group(mw.param)  # raises for a placement other than fully_shard's rows
        if sharded and isinstance(opts, HorizonOptions):
            raise NotImplementedError(
                f"HyperSTE(method={opts.name!r}) does not run on FSDP2-sharded weights (weight "
                f"{sharded[0].name!r}): its horizon snapshots and replays work on whole tensors. "
                "Supported under fully_shard: the per-step methods 'analytical' and 'delayed' "
                "(docs/design.md §10.4); the horizon methods run on one process or under DDP"
            )
        opts.check(optimizer, managed, model)
        _check_scaler_supported(opts, self._active_scaler())
        claim_all([mw.quantizer for mw in managed], "gradient", self)  # no other wrapper's ψ on them
        # validation is over: from here on the model is changed
        for mw in managed:
            mw.surrogate.boundary = opts.boundary or opts.default_boundary
            mw.surrogate.b = float(opts.boundary_width)
            mw.quantizer.defer_surrogate = True
            for pname in mw.surrogate.param_names:  # FSDP2: θ sharded like its weight's rows
                setattr(mw.surrogate, pname, shard_rows_like(getattr(mw.surrogate, pname), mw.param))
        self.options = opts
        self.managed = managed
        self.method = opts.build(optimizer, managed, model)
        self.steps = 0

    @property
    def method_name(self) -> str:
        return self.options.name

    def _unguarded_buffers(self) -> list[Tensor]:
        """θ, when the method writes it only after the base optimizer's step (analytical,
        delayed): the step guard need not hold a copy of it."""
        if not self.method.writes_theta_last:
            return []
        return [t for mw in self.managed for t in mw.surrogate.params()]

    def _find_managed(self, model: nn.Module | None) -> list[ManagedWeight]:
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        managed, seen = [], set()
        for k, p in enumerate(self.params()):
            entry = lookup(p)
            if entry is None or id(p) in seen or not getattr(entry.surrogate, "learnable", False):
                continue
            seen.add(id(p))
            check_latent_dtype(p, "HyperSTE", repr(names.get(id(p), f"w{k}")))
            managed.append(ManagedWeight(p, entry.quantizer, names.get(id(p), f"w{k}")))
        if not managed:
            raise ValueError(
                "HyperSTE found no quantized weight with a learnable surrogate among the optimizer's "
                "parameters; quantize the model with one, e.g. "
                "metaste.quantize_model(model, bits=2, surrogate='slste'), and build the optimizer "
                "over the quantized model's parameters" + _foreign_hint(model, list(self.params()))
            )
        return managed

    def release(self) -> None:
        """Hand ψ back to the quantizers' backward (undo ``defer_surrogate``). Call it before
        training the model without this wrapper; the wrapper must not be stepped afterwards.
        Under FSDP2 it gathers the sharded θ back into whole buffers: call it on every rank."""
        for mw in self.managed:
            release(mw.quantizer, "gradient", self)
            mw.quantizer.defer_surrogate = False
            for pname in mw.surrogate.param_names:
                setattr(mw.surrogate, pname, gather(getattr(mw.surrogate, pname)))
        self.released = True

    def _managed_params(self) -> list[Tensor]:
        return [mw.param for mw in self.managed]

    def _closure_reason(self) -> str:
        if isinstance(self.options, HorizonOptions):
            return f"to replay its horizon (method={self.method_name!r})"
        return ""

    def _before_step(self) -> None:
        _check_scaler_supported(self.options, self._active_scaler())

    def _update(self, closure: Closure | None) -> Tensor | None:
        """One step (see the class docstring); returns the closure's loss. The closure may be a
        generator of micro-batch losses (gradient accumulation); without one, the gradients of
        your own ``loss.backward()`` are used (per-step methods). If it raises, no weight, buffer or
        optimizer state has changed (the horizon methods: except inside the replays of a
        horizon's last step)."""
        loss = self.method.step(closure, self._evaluate, self.steps)
        self.steps += 1
        return loss

    def run_horizon(self, closures: Sequence[Closure], extra: Closure | None = None) -> list[Tensor]:
        """Horizon methods: one whole horizon over ``closures`` (T re-callable closures), as T
        ``step`` calls; returns the user-pass (θ^0) losses. ``extra``: the batch of L_T for the
        ``extra_*`` last-step rules (default: the first closure)."""
        self._check_horizon("run_horizon")
        losses = self.method.run_horizon(closures, self._evaluate, extra)
        self.steps += len(losses)
        return losses

    def resume_horizon(self, closures: Sequence[Closure]) -> None:
        """Horizon methods, after ``load_state_dict`` in the middle of a horizon: the closures of
        the steps it had already run (bound to the new model), so that its replays can rerun them."""
        self._check_horizon("resume_horizon")
        self.method.resume_horizon(closures)

    def _check_horizon(self, call: str) -> None:
        if not isinstance(self.options, HorizonOptions):
            raise ValueError(f"{call}() is for the horizon methods, not method={self.method_name!r}")

    @property
    def diagnostics(self) -> dict[str, Any]:
        """Surrogate health after the last step (docs/design.md §3.5).

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
            for pname, t in zip(s.param_names, mw.theta()):  # FSDP2: the rank's rows
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
        out.update(self.method.diagnostics())
        return out

    def _settings(self) -> dict[str, Any]:
        """The options that define the trajectory (plain values; not ``memory_budget``, hooks or
        hyper-optimizer factories): a checkpoint must match the constructor's."""
        out = {}
        for k in self.options.option_names():
            v = getattr(self.options, k)
            if k != "memory_budget" and (v is None or isinstance(v, (bool, int, float, str))):
                out[k] = v
        return out

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {
            "method_name": self.method_name,
            "options": self._settings(),
            "steps": self.steps,
            "method": self.method.state_dict(),
        }

    def _check_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        super()._check_wrapper_state_dict(state)
        missing = [k for k in ("method_name", "steps", "method") if k not in state]
        if missing:
            raise ValueError(
                f"HyperSTE state_dict['metaste'] lacks {missing}: it is not a HyperSTE checkpoint"
            )
        if state["method_name"] != self.method_name:
            raise ValueError(
                f"state_dict was saved by HyperSTE(method={state['method_name']!r}); this one runs "
                f"method={self.method_name!r}"
            )
        self._check_settings(
            f"HyperSTE(method={self.method_name!r})", state.get("options", {}), self._settings()
        )

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.method.load_state_dict(state["method"])


def _check_scaler_supported(opts: MethodOptions, scaler: Any) -> None:
    if scaler is not None and isinstance(opts, HorizonOptions):
        raise ValueError(
            f"method={opts.name!r} replays its horizon and cannot skip a step on a gradient "
            "overflow; a GradScaler is supported with the per-step methods ('analytical', "
            "'delayed'). Train the horizon methods in bf16 (no loss scaling) or float32"
        )


def _foreign_hint(model: nn.Module | None, params: list[Tensor]) -> str:
    """A sentence for the "no learnable surrogate" error when another library fake-quantizes the
    weights (torchao, brevitas), else ``""``."""
    libs = foreign_libraries(model, params)
    if not libs:
        return ""
    return (
        f" This model's weights are fake-quantized by {' and '.join(sorted(libs))}, whose straight-through "
        "estimator is fixed inside its own quantizer: HyperSTE learns ψ inside metaste's quantizers only. "
        "Either train it with metaste.FOGZO(opt, scales=metaste.adapters.scales_from(model)), or quantize "
        "the float model with metaste.quantize_model(model, bits=..., surrogate='slste') for HyperSTE."
    )
