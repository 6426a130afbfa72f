"""PEGE: progressive element-wise gradient estimation (docs/design.md §7).

Three parts, each a plain function or a small class, joined by the :class:`PEGE` wrapper:

* the curriculum :func:`replace_ratio` r(t) = ln(1 + kτ)/ln(1 + k), τ = min(t/T_r, 1);
* the mixed forward w̃ = v + M⊙(v̂ − v) with the element-wise backward of :class:`_PEGEMix`
  (unreplaced elements get g, replaced ones ψ·g·(1 + δ·sign(g)·e) — EWGS's scaling);
* the discretization-error penalty λ·r(t)·Σ_layers mean(M⊙e²), e = v/s − c with c and s detached:
  its gradient λ_t·2M⊙e/(n·s) is added to each weight's gradient in the step (from the weight's
  last training forward), and to an activation's in the backward of its mix (per forward). So it
  needs no access to the loss: ``loss.backward(); opt.step()`` trains the same as a closure.

Why a wrapper and not quantizer options: the forward mask needs the step count t, the penalty
needs to be added to the loss once per step, and the mask's random stream must be checkpointed —
all three are per-step state that only the code calling ``step`` has. A wrapper keeps them in one
place, works with any base optimizer and any quantized model, and leaves the quantizers (and
their fast STE path) untouched: it installs forward hooks on them and removes them in
:meth:`PEGE.remove`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...quant._functions import fused_psi_name, psi_params
from ...quant.activation import ActivationLSQQuantizer
from ...quant.quantizers import DoReFaBinaryQuantizer
from ...quant.registry import claim_all, lookup, release
from ..core.closure import Closure
from ..core.noise import derive_seed
from ..core.wrapper import OptimizerWrapper, check_quantized_dtypes
from . import passes

__all__ = ["PEGE", "replace_ratio", "SELECTS"]

SELECTS = ("random", "error")


def replace_ratio(t: int, replace_steps: int, k: float) -> float:
    """r(t) = ln(1 + kτ)/ln(1 + k), τ = min(t/T_r, 1); k = 0 is the linear ramp r = τ."""
    tau = min(t / replace_steps, 1.0)
    if tau >= 1.0:
        return 1.0
    return tau if k == 0 else math.log1p(k * tau) / math.log1p(k)


class _PEGEMix(torch.autograd.Function):
    """Forward where(M, v̂, v); backward: v̂ gets M⊙g (the quantizer then applies ψ and LSQ's
    ∂v̂/∂s), v gets (1 − M)⊙g + M⊙|g|⊙ê with ê = δ·ψ·e precomputed (the EWGS term), plus the
    penalty's gradient ``pen`` when given (an activation's λ_t·2M⊙e/(n·s))."""

    @staticmethod
    def forward(ctx, v, vhat, mask, e_scaled, pen):  # type: ignore[override]
        ctx.save_for_backward(mask, e_scaled, pen)
        return vhat if mask is None else passes.mix(mask, vhat, v)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        gv, gvhat = passes.mix_backward(g, *ctx.saved_tensors)
        return gv, gvhat, None, None, None


class _Site:
    """One hooked quantizer: a weight quantizer (from the registry) or an activation quantizer."""

    def __init__(
        self, index: int, module: nn.Module, kind: str, delta: float, param: Tensor | None = None
    ) -> None:
        self.index, self.module, self.kind, self.delta = index, module, kind, delta
        self.param = param  # a weight site's weight (its penalty gradient is added in the step)
        self.calls = 0
        self.handle: Any = None
        self.record: tuple[Tensor, Tensor, Tensor | None] | None = None  # e, s, M of the last forward

    def front(
        self, x: Tensor, uniforms: Tensor | None, r: float
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(e, s, ê, M) of the input: e = x/s − c, its step s, EWGS's ê = δ·ψ(u)·e (None for δ = 0)
        and the mask 1{U < r} of ``uniforms`` (None without them); all detached."""
        q = self.module
        x = x.detach()
        binary = isinstance(q, DoReFaBinaryQuantizer)
        if binary:
            s = q.magnitude(x).clamp(min=1e-8)
        else:
            s = q.s.detach().clamp(min=1e-8) if isinstance(q, ActivationLSQQuantizer) else q.scale(x)
        name, theta = "ste", ()
        if self.kind == "weight":
            name = fused_psi_name(q.surrogate, False)
            theta = psi_params(q.surrogate) if name is not None else ()
        fused_psi = name if self.delta != 0.0 else None
        e, e_scaled, mask = passes.front(fused_psi, x, s, binary, uniforms, r, self.delta, q.qn, q.qp, theta)
        if self.delta != 0.0 and name is None:  # a ψ with arguments (fd, tanh), eagerly
            e_scaled = q.surrogate.psi(x / s, q.qn, q.qp).mul_(e).mul_(self.delta)
        return e, s, e_scaled, mask


class PEGE(OptimizerWrapper):
    r"""Progressive Element-wise Gradient Estimation on any base optimizer (docs/design.md §7).

    Example::

        model = metaste.quantize_model(net, bits=2, quantizer="lsq")
        opt = metaste.PEGE(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=3000, model=model)
        loss = opt.step(lambda: F.cross_entropy(model(x), y))   # returns the task loss

    At step t a fraction r(t) of each quantized tensor is replaced by its quantized value (mask M:
    random, redrawn every forward, or the elements nearest their grid point); the rest stays in
    full precision. Replaced elements get the element-wise gradient ψ·g·(1 + δ·sign(g)·e) and the
    penalty λ·r(t)·mean(M⊙e²) pulls them to their grid point. Eval mode uses M ≡ 1; from
    t ≥ T_r on, M ≡ 1 and with δ = λ = 0 the step is the plain STE (LSQ) step bitwise.

    Args:
        optimizer: the base optimizer over a quantized model's parameters.
        total_steps (int): the run's length; T_r defaults to half of it.
        replace_steps (int): T_r, the steps over which r goes from 0 to 1 (> 0).
        k (float ≥ 0, default 9): curvature of the log curriculum (0: linear).
        select (``"random"`` | ``"error"``): how M is chosen.
        delta (float ≥ 0 or None): EWGS's δ; ``None``: 1e−3/(2^b − 1) per layer.
        lam (float ≥ 0, default 1e−2): λ of the penalty.
        model (nn.Module, optional): also mix (and penalise) its activation quantizers.
        seed (int): seeds the random masks (a private generator: the global RNG is not touched).
        grad_scaler, max_grad_norm: fp16 loss scaling and gradient clipping, as in
            :class:`~metaste.FOGZO` (docs/design.md §5.1).

    The hooks live on the model's quantizers: ``copy.deepcopy(model)`` copies them too (call
    :meth:`remove` first, or load a ``state_dict`` into a fresh model).
    """

    SETTINGS = ("total_steps", "replace_steps", "k", "select", "lam", "seed")

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_steps: int | None = None,
        replace_steps: int | None = None,
        k: float = 9.0,
        select: str = "random",
        delta: float | None = None,
        lam: float = 1e-2,
        model: nn.Module | None = None,
        seed: int = 0,
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
    ) -> None:
        for name, value in (("total_steps", total_steps), ("replace_steps", replace_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"Invalid {name} (T_r): {value!r}; it must be an int >= 1 (T_r <= 0 is invalid)"
                )
        if replace_steps is None:
            if total_steps is None:
                raise ValueError("PEGE needs total_steps= (T_r defaults to half of it) or replace_steps=")
            replace_steps = max(1, total_steps // 2)
        if not (math.isfinite(k) and k >= 0):
            raise ValueError(f"Invalid k: {k}; the curriculum curvature must be finite and >= 0 (0: linear)")
        if select not in SELECTS:
            raise ValueError(f"Invalid select: {select!r}; choose one of {SELECTS}")
        if delta is not None and not (math.isfinite(delta) and delta >= 0):
            raise ValueError(
                f"Invalid delta: {delta}; it must be finite and >= 0 (or None for 1e-3/(2^b - 1))"
            )
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"Invalid lam: {lam}; it must be finite and >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        super().__init__(optimizer, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        check_quantized_dtypes(self.params(), "PEGE")
        self.total_steps, self.replace_steps, self.k = total_steps, replace_steps, float(k)
        self.select, self.lam, self.seed = select, float(lam), seed
        self.steps = 0
        self.sites: list[_Site] = []
        for q, p in self._weight_quantizers():
            self._add_site(q, "weight", delta, p)
        if model is not None:
            _check_model_is_trained(model, self.params())
            for m in model.modules():
                if isinstance(m, ActivationLSQQuantizer):
                    self._add_site(m, "activation", delta)
        if not self.sites:
            raise ValueError(
                "PEGE found no quantized weight among the optimizer's parameters; quantize the model "
                "with metaste.quantize_model(...) before building the optimizer"
            )
        try:
            claim_all([site.module for site in self.sites], "forward", self)  # no second curriculum
        except BaseException:
            self.remove()
            raise

    def _weight_quantizers(self) -> Iterable[tuple[nn.Module, Tensor]]:
        seen = set()
        for p in self.params():
            entry = lookup(p)
            if entry is not None and p.requires_grad and id(entry.quantizer) not in seen:
                seen.add(id(entry.quantizer))
                yield entry.quantizer, p

    def _add_site(
        self, module: nn.Module, kind: str, delta: float | None, param: Tensor | None = None
    ) -> None:
        d = 1e-3 / (2**module.bits - 1) if delta is None else float(delta)
        site = _Site(len(self.sites), module, kind, d, param)
        site.handle = module.register_forward_hook(lambda mod, args, out, s=site: self._hook(s, args[0], out))
        self.sites.append(site)

    _release_call = "remove"

    def remove(self) -> None:
        """Remove the forward hooks: the model is a plain quantized model again, and this
        wrapper cannot step any more."""
        for s in self.sites:
            s.handle.remove()
            release(s.module, "forward", self)
        self.released = True

    # -- schedule ------------------------------------------------------------------------------

    def ratio(self, t: int | None = None) -> float:
        """r(t), the replaced fraction at step t (default: the current step)."""
        return replace_ratio(self.steps if t is None else t, self.replace_steps, self.k)

    # -- the mixed forward ---------------------------------------------------------------------

    def _uniforms(self, site: _Site, x: Tensor) -> Tensor:
        """The uniforms of a random mask: a private generator seeded by (seed, step, site, call)."""
        gen = torch.Generator(device=x.device).manual_seed(
            derive_seed(self.seed, self.steps, site.index, site.calls)
        )
        return torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)

    @staticmethod
    def _error_mask(e: Tensor, r: float) -> Tensor:
        """M of ``select="error"``: 1 at the ⌈r·n⌉ elements nearest their grid point."""
        m = torch.zeros(e.numel(), dtype=e.dtype, device=e.device)
        count = math.ceil(r * e.numel())
        if count:
            m[torch.topk(e.abs().flatten(), count, largest=False).indices] = 1.0
        return m.view(e.shape)

    def _hook(self, site: _Site, x: Tensor, out: Tensor) -> Tensor | None:
        if not site.module.training:
            return None  # eval: M ≡ 1
        r = self.ratio()
        lam_t = self.lam * r
        need_e = r < 1.0 or site.delta != 0.0 or lam_t != 0.0
        if not need_e:
            return None
        random = r < 1.0 and self.select == "random"
        e, s, e_scaled, mask = site.front(x, self._uniforms(site, x) if random else None, r)
        if r < 1.0 and not random:
            mask = self._error_mask(e, r)
        site.calls += 1
        site.record = (e, s, mask) if lam_t != 0.0 else None
        pen = None
        if lam_t != 0.0 and site.kind == "activation":
            pen = passes.penalty_grad(e, s, mask, lam_t)
        if mask is None and e_scaled is None and pen is None:
            return None
        return _PEGEMix.apply(x, out, mask, e_scaled, pen)

    def penalty(self) -> Tensor | float:
        """Σ over the hooked tensors of mean(M⊙(x/s − c)²) from their last forward (c, s detached)."""
        total: Tensor | float = 0.0
        for site in self.sites:
            if site.record is None:
                continue
            e, _, mask = site.record
            e2 = e.square()
            total = total + (e2.mean() if mask is None else (e2 * mask).mean())
        return total

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def _add_penalty_grads(self) -> None:
        """Add λ_t·2M⊙e/(n·s) to every weight's gradient, from its last training forward."""
        lam_t = self.lam * self.ratio()
        for site in self.sites:
            if site.param is None or site.record is None or site.param.grad is None:
                continue
            e, s, mask = site.record
            site.param.grad.add_(passes.penalty_grad(e, s, mask, lam_t))

    def _reset_sites(self) -> None:
        for site in self.sites:
            site.record, site.calls = None, 0

    def _update(self, closure: Closure | None) -> Tensor | None:
        """One step: the mixed forward and backward (the closure's, or your own before
        ``step()``), the penalty's gradient, the base step. Returns the closure's (task) loss.
        If it raises, the weights, BatchNorm statistics and optimizer state are as they were."""
        try:  # the masks of a step's forwards count from the end of the last step
            loss = self._evaluate(closure)
            self._add_penalty_grads()
        finally:
            self._reset_sites()
        self.optimizer.step()
        self.steps += 1
        return loss

    # -- checkpoints ---------------------------------------------------------------------------

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]

    def __repr__(self) -> str:
        return (
            f"PEGE(T_r={self.replace_steps}, k={self.k}, select={self.select!r}, lam={self.lam}, "
            f"{self.optimizer!r})"
        )


def _check_model_is_trained(model: nn.Module, params: Iterable[Tensor]) -> None:
    """``model=`` must be the model the optimizer trains: its activation quantizers get the mask,
    so another model's would be hooked while this one trains without them."""
    own = {id(p) for p in model.parameters()}
    trained = [p for p in params if p.requires_grad]
    if trained and not any(id(p) in own for p in trained):
        raise ValueError(
            "PEGE(model=...) got a model none of whose parameters the optimizer trains; pass the model "
            "whose parameters the optimizer was built over (its activation quantizers get the curriculum)"
        )
