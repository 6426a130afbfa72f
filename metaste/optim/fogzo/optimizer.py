"""FOGZO: First-Order-Guided Zeroth-Order gradients for quantized weights (docs/design.md §4).

The class :class:`FOGZO` does the bookkeeping (β schedule, managed parameters, RNG and buffer
hygiene, DDP, the GradScaler path, checkpoints); the math is the plain function
:func:`~metaste.optim.fogzo.estimator.fogzo_estimate`, which reads against docs/design.md §4.3
line by line. The (ε̄, p̄, sampler) table of §4.2 is in :mod:`metaste.optim.fogzo.smoothing`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..._compile import FUSE_MIN
from ..core.closure import Closure
from ..core.fsdp import all_reduce_sum, as_dtensor_like, global_offset, is_dtensor, local, mesh_group
from ..core.probe import Probe
from ..core.wrapper import OptimizerWrapper
from .estimator import Shards, fogzo_estimate
from .managed import Managed, ManagedWeights, ScaleSpec
from .settings import beta_at, check_settings

__all__ = ["FOGZO"]


class FOGZO(ManagedWeights, OptimizerWrapper):
    r"""First-Order-Guided Zeroth-Order gradients (Yang & Aamodt, NeurIPS 2025) on any optimizer.

    Example::

        model = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
        opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10_000)
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))  # no backward in the closure

    For every *managed* weight (a quantized weight found in metaste's registry, or one named in
    ``scales=``) the STE gradient g is replaced by a central-difference zeroth-order estimate
    along random directions tilted toward the normalized STE gradient; every other parameter
    (biases, norms, LSQ's step s) keeps its backprop gradient and is never perturbed.
    Per step t (docs/design.md §4.3–§4.5)::

        β = β_t;  L₀ = closure() with backward → g            (RNG state saved before)
        ε = ε̄·s per managed tensor (ε̄ from its STE kind, docs/design.md §4.2)
        N = ‖ε⊙g‖ over all managed tensors;  ĝ = ε⊙g / N
        for i = 1..n:                                           (no_grad, train mode, RNG reset)
            d_i = √β σ_i ĝ + √(1−β) z_i,   σ_i = ±1, z_i ∼ p̄ per element
            c_i = [L(v + ε⊙d_i) − L(v − ε⊙d_i)] / 2          (float64; one-sided: L(v+ε⊙d_i) − L₀)
        c ← mean over DDP ranks
        v.grad = G = (1/n) Σ_i c_i d_i ⊘ ε                      (replaces g)
        optimizer.step();  return L₀

    Schedule: β_t = 1 − (1 − β_min)·min(1, t/T), T = ``total_steps``, t = 0, 1, … counts every
    ``step()`` call; steps t < ⌊``ste_fraction``·T⌋ are plain STE steps (the paper's
    "r % STE + (100 − r) % FOGZO"). n-SPSA is ``beta_schedule=lambda t: 0.0``; its clean pass
    runs without backward unless an unmanaged parameter requires grad.

    Args:
        optimizer: the base ``torch.optim.Optimizer`` (its ``param_groups`` and ``state`` are
            shared, so LR schedulers, ``zero_grad`` and ``add_param_group`` work on either).
        n (int, default 1): directions per step; a step costs 1 forward+backward + 2n no-grad
            forwards (n with ``one_sided``).
        beta_min (float, default ``None`` = 1 − 1/D, D = number of managed elements): the
            final β in [0, 1]. The paper tunes it close to 1 (0.999 for an 8k-weight MLP).
        total_steps (int, default ``None``): T, required when β decays (``beta_min < 1`` and no
            ``beta_schedule``) or ``ste_fraction > 0``.
        beta_schedule (callable, default ``None``): ``beta_schedule(t) -> float`` in [0, 1]
            overrides the linear schedule; it is not saved by ``state_dict`` (pass it again).
        ste_fraction (float, default 0.0): the fraction r of ``total_steps`` run as plain STE.
        one_sided (bool, default False): c_i = L(v + ε⊙d_i) − L₀: n instead of 2n extra
            forwards, the same expectation, more variance.
        seed (int, default 0): with the step and sample index, determines σ_i and z_i
            (identical on every DDP rank; the stream depends on the device type only).
        restore (str, default ``"inplace"``): ``"inplace"`` adds +1, −2, +1 times ε⊙d_i
            and holds no copy (at n = 1 the restore is the combine pass, which draws the same
            noise: 3 noise draws; 4 per sample at n > 1). In-place restore is not exact: one
            cycle leaves each tensor within 4 ulp of its max|v|, and the rounding errors of many
            cycles add up as a random walk (measured: ≈ 17 ulp of max|v| after 200 cycles at
            lr = 0), far below any learning-rate step. ``"copy"`` keeps a copy of the managed
            weights during the no-grad passes, restores them bitwise and mirrors v⁺ into v⁻
            without regenerating the noise (2 draws per sample): for runs that must equal a
            reference bit for bit.
        keep_noise (bool, default False): keep the n·D noise values of a step instead of
            regenerating them: one draw per sample, n·D floats more memory, identical results.
            A step on the eager path (``fused`` off or below its threshold) with at most 2^16
            noise values keeps them anyway (the hash dominates a small step's passes).
        scales (mapping, default ``None``): manage weights metaste's registry does not know
            (a model fake-quantized by another library): ``{weight: s}`` or
            ``{weight: (s, ste_kind)}`` with s the step size (a positive float, a tensor
            broadcastable to the weight, or a zero-arg callable returning either, called every
            step) and ``ste_kind`` one of ``"identity"`` (round-based grids, the default),
            ``"hardtanh"``, ``"tanh"``, ``"approxsign"`` (binary weights). Entries override the
            registry for the same weight.
        process_group (default ``None``): the group the c_i are averaged over when
            torch.distributed is initialized (``None``: the default group).
        fused (default ``"auto"``): compile the perturbation and combine passes with
            ``torch.compile`` (one vectorised C++ loop per pass on CPU, one Triton kernel on GPU;
            the same numbers as the eager path). ``"auto"``: when the managed weights hold at least
            2^16 elements; ``True``/``False``: always / never. The first step compiles (seconds);
            a failed compile warns once and runs eagerly.
        grad_scaler (default ``None``): a ``torch.amp.GradScaler`` for fp16: backward on the scaled
            loss, unscale before ĝ and G, an inf/NaN gradient skips the step (no perturbed passes,
            no step count), then ``scaler.update()`` (docs/design.md §5.1). Do not call the
            scaler's ``step``/``update`` yourself.
        max_grad_norm (default ``None``): clip the backprop gradient (the STE gradient of the
            managed weights and the unmanaged ones) to this total norm, before the estimate; G is
            not clipped — its norm is the zeroth-order noise's (docs/design.md §5.1).
            :attr:`last_grad_norm` holds the norm before clipping.

    Notes:
        * The closure returns the loss without calling ``backward`` and may be called 1 + 2n
          times per step; each perturbed call runs under ``no_grad`` in the model's current
          (train) mode with the torch RNG reset to its state before the clean call, so dropout
          masks and random augmentations match; afterwards the RNG continues from its state
          after the clean call. Python's ``random`` and NumPy's global RNG are not reset.
        * Buffers (BatchNorm running statistics) of the modules the closure refers to (found
          without hooks, so ``torch.compile`` models keep one graph; docs/design.md §10.5) are
          restored after each perturbed pass: only the clean pass updates them.
        * Under DDP the weight gradients are already averaged by backward; FOGZO averages the
          c_i, so every rank computes the same G.
        * A non-finite L₊/L₋ keeps g for that step (with β ≡ 0 and no backward there is no g:
          the managed weights then get no gradient), counts it in :attr:`fallbacks` and
          warns once. Managed weights must be float32/float64: bf16 latents swallow the
          perturbation.
        * Gradient accumulation: the closure may yield the micro-batch losses (a generator);
          each is backpropagated as it comes and the perturbed passes loop over the same
          micro-batches (:class:`~metaste.optim.core.amp.Accumulated` builds such a closure). AMP:
          run the closure's forward under ``torch.autocast``; fp16 takes ``grad_scaler=`` (a
          loss scaled by the user raises).
        * ``load_state_dict`` keeps the constructor's settings: a checkpoint saved with another
          ``seed``, ``n``, ``beta_min``, ``total_steps``, ``ste_fraction`` or ``one_sided``
          raises ``ValueError`` (docs/design.md §5).
    """

    _clip_before_base_step = False  # max_grad_norm clips the backprop gradient, not G

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        n: int = 1,
        beta_min: float | None = None,
        total_steps: int | None = None,
        beta_schedule: Callable[[int], float] | None = None,
        ste_fraction: float = 0.0,
        one_sided: bool = False,
        seed: int = 0,
        restore: str = "inplace",
        keep_noise: bool = False,
        scales: Mapping[Tensor, ScaleSpec | tuple[ScaleSpec, str]] | None = None,
        process_group: Any = None,
        fused: bool | str = "auto",
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
    ) -> None:
        check_settings(n, beta_min, total_steps, beta_schedule, ste_fraction, restore, seed, fused)
        super().__init__(optimizer, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        self.fused = fused
        self.n = n
        self.beta_min = beta_min
        self.total_steps = total_steps
        self.beta_schedule = beta_schedule
        self.ste_fraction = float(ste_fraction)
        self.one_sided = bool(one_sided)
        self.seed = seed
        self.restore = restore
        self.keep_noise = bool(keep_noise)
        self.process_group = process_group
        self._scales = self._parse_scales(scales)
        self._warned_fallback = False
        managed = self._managed()
        if not managed:
            frozen = self._managed(include_frozen=True)
            raise ValueError(
                f"FOGZO found no managed parameters: the {len(frozen)} quantized weight(s) among the "
                "optimizer's parameters are all frozen (requires_grad=False); unfreeze them, or use "
                "the bare optimizer"
                if frozen
                else "FOGZO found no managed parameters: none of the optimizer's parameters is a "
                "quantized weight. Quantize the model with metaste.quantize_model(...) before "
                "building the optimizer, or name the fake-quantized weights with "
                "scales={weight: step_size}"
            )
        for m in managed:
            if m.scale() is not None:  # a library that sets its scales in the first forward: at step time
                self._check_scale(m)
        self.steps = 0  # t: step() calls so far
        self.fallbacks = 0  # steps that kept the STE gradient (a non-finite perturbed loss)
        # step size s per managed weight (mean over its elements): at its first FOGZO step, now
        self.initial_scales: dict[str, float] = {}
        self.scales: dict[str, float] = {}
        self._warned_scale = False
        self._step_weights: list[Tensor] = []  # the managed weights of the current step

    # -- configuration -----------------------------------------------------------------------

    def _managed_params(self) -> list[Tensor]:
        return self._step_weights

    def beta_at(self, t: int, num_managed: int | None = None) -> float:
        """β_t (docs/design.md §4.4); ``num_managed`` = D for the default β_min = 1 − 1/D."""
        if num_managed is None and self.beta_schedule is None:
            num_managed = sum(m.param.numel() for m in self._managed())
        return beta_at(t, num_managed, self.beta_min, self.total_steps, self.beta_schedule)

    # -- the step ----------------------------------------------------------------------------

    def _closure_reason(self) -> str:
        return "to evaluate the loss again at perturbed weights"

    def _update(self, closure: Closure | None) -> Tensor:
        """One FOGZO step on ``closure`` (returns the loss, no backward; or a generator of
        micro-batch losses); returns the clean loss. If it raises, no weight, buffer or optimizer
        state has changed."""
        assert closure is not None  # step() refuses a missing one (_closure_reason)
        t = self.steps
        if t < math.floor(self.ste_fraction * (self.total_steps or 0)):  # the STE phase
            loss = self._evaluate(closure)
            self._clip()
            self.optimizer.step()
            self.steps = t + 1
            return loss
        managed = self._managed()
        if not managed:
            raise ValueError(
                "FOGZO has no managed weight to train: every quantized weight it manages is frozen "
                "(requires_grad=False) now; unfreeze one, or step the bare optimizer (opt.optimizer)"
            )
        d_managed = sum(m.param.numel() for m in managed)
        beta = self.beta_at(t, d_managed)
        weights = [m.param for m in managed]
        self._step_weights = weights
        is_managed = {id(p) for p in weights}
        needs_backward = beta > 0 or any(p.requires_grad and id(p) not in is_managed for p in self.params())
        probe = Probe(weights)
        loss = self._evaluate(closure, backward=needs_backward)
        self._clip()  # the backprop gradient, not G (docs/design.md §5.1)
        probe.clean_pass_done(self.params())
        try:
            eps = [self._eps(m) for m in managed]
            for m in managed:
                if m.param in self._scales:  # a user's callable can change (the registry's s cannot be <= 0)
                    self._check_scale(m)
        except BaseException:
            self._zero_grads()
            raise
        self._track_scales(managed, eps, t)
        fused = self.fused is True or (self.fused == "auto" and d_managed >= FUSE_MIN)
        G, c = self._estimate(closure, probe, managed, eps, beta=beta, loss=float(loss), step=t, fused=fused)
        self._set_grads(weights, G, c, t)
        self.optimizer.step()
        self.steps = t + 1
        return loss

    def _estimate(
        self,
        closure: Closure,
        probe: Probe,
        managed: list[Managed],
        eps: list[Tensor],
        *,
        beta: float,
        loss: float,
        step: int,
        fused: bool,
    ) -> tuple[list[Tensor] | None, Tensor]:
        """:func:`fogzo_estimate` over the managed weights (the rank's shards under FSDP2), each
        perturbed pass run by ``probe`` on the modules the step guard found."""
        # the buffers of the modules the step guard found; a global forward hook only as the
        # fallback (it cannot be traced through torch.compile: docs/design.md §10.5)
        modules = self._step_modules or []
        weights = [m.param for m in managed]
        # FSDP2 (docs/design.md §10.4): the rank's shards, their offsets, the norm summed over ranks
        sharded = [p for p in weights if is_dtensor(p)]
        if sharded and not modules:
            raise ValueError(
                "FOGZO over FSDP2-sharded weights needs to find the model in the closure (to reshard it "
                "between the perturbed passes); let the closure refer to the model, e.g. "
                "opt.step(lambda: loss_fn(model(x), y))"
            )
        shards = None
        if sharded:
            group = mesh_group(sharded[0])
            shards = Shards(
                [global_offset(p) for p in weights],
                [p.numel() for p in weights],
                lambda x: all_reduce_sum(x, group, weights[0].device),
            )
        with probe.passes(closure, type(self).__name__, modules, reshard_between=bool(sharded)) as loss_at:
            return fogzo_estimate(
                [local(p) for p in weights],
                [None if p.grad is None else local(p.grad) for p in weights],
                eps,
                [m.kind for m in managed],
                loss_at,
                beta=beta,
                n=self.n,
                seed=self.seed,
                step=step,
                one_sided=self.one_sided,
                loss0=loss,
                restore=self.restore,
                keep_noise=self.keep_noise,
                reduce=lambda c: self._all_reduce_mean(c, weights[0].device),
                fused=fused,
                shards=shards,
            )

    def _set_grads(self, weights: list[Tensor], G: list[Tensor] | None, c: Tensor, t: int) -> None:
        """G as the weights' gradients for the base step, or, where a perturbed loss was not
        finite (G is None), the STE gradient kept (counted, warned once)."""
        if G is None:
            self.fallbacks += 1
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    f"FOGZO step {t}: a perturbed loss was not finite (c = {c.tolist()}); kept the STE "
                    "gradient for this step (counted in FOGZO.fallbacks; warning once)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        for p, g in zip(weights, G):
            if not is_dtensor(p):
                p.grad = g
            elif p.grad is None or local(p.grad).data_ptr() != g.data_ptr():  # G was not computed in place
                p.grad = as_dtensor_like(g, p)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """``{"step", "fallbacks", "step_sizes": {weight: {"initial", "current", "ratio"}}}``: the
        step size s (mean) of each managed weight at its first FOGZO step and now; a ratio far
        from 1 (≥ 10× either way warns) flags a run-away learned step."""
        sizes = {
            k: {
                "initial": s0,
                "current": self.scales[k],
                "ratio": self.scales[k] / s0 if s0 > 0 else math.inf,
            }
            for k, s0 in self.initial_scales.items()
            if k in self.scales
        }
        return {"step": self.steps, "fallbacks": self.fallbacks, "step_sizes": sizes}

    def _all_reduce_mean(self, c: Tensor, device: torch.device) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return c
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return c
        on_device = c.to(device)
        dist.all_reduce(on_device, group=self.process_group)
        return on_device.cpu() / world

    # -- checkpoints -------------------------------------------------------------------------

    #: the settings that define the trajectory: a checkpoint must match the constructor's
    SETTINGS = ("seed", "n", "beta_min", "total_steps", "ste_fraction", "one_sided")

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "fallbacks": self.fallbacks,
            "initial_scales": dict(self.initial_scales),
        }

    def _check_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        super()._check_wrapper_state_dict(state)
        missing = [k for k in ("steps", "fallbacks") if k not in state]
        if missing:
            raise ValueError(f"FOGZO state_dict['metaste'] lacks {missing}: it is not a FOGZO checkpoint")

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the step count and the fallback count (the settings were checked to match the
        constructor's, :meth:`_check_wrapper_state_dict`)."""
        self.steps = state["steps"]
        self.fallbacks = state["fallbacks"]
        self.initial_scales = dict(state.get("initial_scales", {}))

    def __repr__(self) -> str:
        return (
            f"FOGZO(n={self.n}, beta_min={self.beta_min}, total_steps={self.total_steps}, "
            f"one_sided={self.one_sided}, restore={self.restore!r}, {self.optimizer!r})"
        )
