"""FOGZO's managed weights and their step sizes (docs/design.md §4.2, §4.4): which weights it
perturbs (metaste's registry, or ``scales=`` for a model fake-quantized elsewhere), ε = ε̄·s per
weight with its checks, and the record of each step size s that warns when a learned step runs
away. The mixin :class:`ManagedWeights` is part of :class:`metaste.optim.fogzo.FOGZO`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ...quant import registry
from ...quant.registry import lookup
from ..core.fsdp import local, local_scale
from ..core.host import host_floats as _host_floats
from ..core.wrapper import check_latent_dtype
from .smoothing import SMOOTHINGS, STE_KINDS

__all__ = ["ManagedWeights", "ScaleSpec"]

ScaleSpec = Tensor | float | Callable[[], Tensor | float]


@dataclass(frozen=True)
class Managed:
    """One weight FOGZO perturbs: the parameter, its step size s, its STE kind (the smoothing of
    its noise) and the name its errors give."""

    param: Tensor
    scale: Callable[[], Tensor | float | None]
    kind: str
    name: str  # "parameter k (shape ...)" of the optimizer, for error messages


class ManagedWeights:
    """The managed weights of a FOGZO wrapper (its ``params()`` and ``scales=``), their ε and the
    step-size record (:attr:`initial_scales`, :attr:`scales`)."""

    _scales: dict[Tensor, Managed]
    initial_scales: dict[str, float]
    scales: dict[str, float]
    _warned_scale: bool

    def _parse_scales(self, scales: Mapping | None) -> dict[Tensor, Managed]:
        if scales is None:
            return {}
        if not isinstance(scales, Mapping):
            raise TypeError(f"scales must be a dict weight -> s or (s, kind), got {type(scales).__name__}")
        own = {id(p) for p in self.params()}
        parsed: dict[Tensor, Managed] = {}
        for p, spec in scales.items():
            if not isinstance(p, Tensor) or id(p) not in own:
                raise ValueError("scales= names a tensor that is not a parameter of the wrapped optimizer")
            s, kind = spec if isinstance(spec, tuple) else (spec, "identity")
            if kind not in STE_KINDS:
                raise ValueError(f"Invalid STE kind {kind!r} in scales=; choose one of {STE_KINDS}")
            fn = s if callable(s) else (lambda s=s: s)
            parsed[p] = Managed(p, fn, kind, "")
        return parsed

    def _managed(self, include_frozen: bool = False) -> list[Managed]:
        """The managed weights, in parameter order (registry entries or ``scales=``). Cached per
        step until the parameter list, a ``requires_grad`` / dtype or the registry changes (the
        lookups were a visible part of a small model's step)."""
        if include_frozen:
            return self._find_managed(True)
        key = (registry.version(), tuple((id(p), p.requires_grad, p.dtype) for p in self.params()))
        cached = getattr(self, "_managed_cache", None)
        if cached is None or cached[0] != key:
            cached = self._managed_cache = (key, self._find_managed(False))
        return cached[1]

    def _find_managed(self, include_frozen: bool) -> list[Managed]:
        out = []
        for k, p in enumerate(self.params()):
            if not p.requires_grad and not include_frozen:
                continue
            name = f"parameter {k} (shape {tuple(p.shape)})"
            m = self._scales.get(p)
            if m is None:
                entry = lookup(p)
                if entry is None:
                    continue
                m = Managed(p, entry.scale, entry.ste_kind, name)
            else:
                m = Managed(p, m.scale, m.kind, name)
            check_latent_dtype(p, "FOGZO", name)
            out.append(m)
        return out

    def _eps(self, m: Managed) -> Tensor:
        s = local_scale(m.scale(), m.param)  # FSDP2: the rows of this rank's shard
        if s is None:
            raise ValueError(
                f"the step size of the managed weight {m.name} is None: it is not initialised yet "
                "(torchao and similar libraries set their scales in the first forward). Pass a "
                "callable in scales= that returns the current step once it exists; FOGZO reads it "
                "after each step's clean forward"
            )
        s = torch.as_tensor(s, dtype=m.param.dtype, device=m.param.device).detach()
        return s * SMOOTHINGS[m.kind].eps_bar

    def _check_scale(self, m: Managed) -> None:
        e = self._eps(m)
        try:
            torch.broadcast_shapes(e.shape, local(m.param).shape)
        except RuntimeError as err:
            raise ValueError(
                f"the step size of the managed weight {m.name} has shape {tuple(e.shape)}, "
                "which does not broadcast to it"
            ) from err
        if not bool(torch.all(e > 0) & torch.all(torch.isfinite(e))):
            raise ValueError(f"the step size of the managed weight {m.name} must be finite, > 0")

    #: a managed weight's step size that moved by this factor (either way) since its first FOGZO
    #: step triggers the run-away warning
    SCALE_ALARM = 10.0

    def _track_scales(self, managed: list[Managed], eps: list[Tensor], t: int) -> None:
        """Record each managed weight's step size s (mean) and warn once when one has grown or
        shrunk by :attr:`SCALE_ALARM` or more since its first FOGZO step. The run-away it flags:
        FOGZO's noise term moves every managed weight by about lr·√((1−β)D)·|∇L| per step
        whatever s is, so the weights diffuse past the grid's range; a learned step (LSQ) follows
        them out (its gradient from clipped weights pushes s up), and a coarser grid on the
        logits layer can collapse the model (docs/design.md §4.4)."""
        means = _host_floats([e.reshape(()) if e.numel() == 1 else e.mean() for e in eps])
        for m, e_mean in zip(managed, means):
            s = e_mean / SMOOTHINGS[m.kind].eps_bar
            self.scales[m.name] = s
            s0 = self.initial_scales.setdefault(m.name, s)
            ratio = s / s0 if s0 > 0 else math.inf
            if not self._warned_scale and not 1 / self.SCALE_ALARM < ratio < self.SCALE_ALARM:
                self._warned_scale = True
                warnings.warn(
                    f"FOGZO step {t}: the step size of the managed weight {m.name} moved from {s0:.3g} to "
                    f"{s:.3g} ({ratio:.3g}x) since its first FOGZO step. FOGZO's noise spreads the weights "
                    "and a learned step (LSQ) follows them; if the loss rises, use quantizer='fixed', keep "
                    "the last layer in float (keep_last=True), give the step sizes a lower lr, or raise "
                    "beta_min (FOGZO.diagnostics['step_sizes']; warning once)",
                    RuntimeWarning,
                    stacklevel=4,
                )
