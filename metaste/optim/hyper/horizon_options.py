"""The options of the horizon methods of HyperSTE (docs/design.md §3.3–3.4): :class:`HorizonOptions`,
the twelve options shared by ``fagu``, ``pfagu`` and ``lgatt`` (horizon T or epochs, K replays,
schedule, last-step rule, warm start, final pass, memory budget, recalibration, hyper-optimizer),
validated and resolved to their defaults when built. The replay protocol they drive is
:class:`~.horizon.HorizonMethod`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from ._common import ManagedWeight
from ._options import HyperOptimizerSpec, MethodOptions, resolve_hyper_optimizer

__all__ = ["LAST_RULES", "SCHEDULES", "HorizonOptions"]


LAST_RULES = ("carry", "ste", "extra_carry", "extra_ste")
SCHEDULES = ("per_step", "shared")


def _default_budget() -> float:
    """Half of the machine's physical memory (bytes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no default limit
        return math.inf


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class HorizonOptions(MethodOptions):
    """Options shared by the horizon methods (docs/design.md §3.3–3.4; ``None`` = the default).
    Common options: :class:`~metaste.optim.hyper._options.MethodOptions`. ``HyperSTE`` needs
    ``model=`` for these methods: its buffers (BN running statistics) are part of the snapshot.

    Args:
        horizon: T, the horizon in steps; or ``horizon_epochs=E`` with ``steps_per_epoch`` (an int
            or a data loader: its ``len()``). Exactly one of the two.
        replays: K replays (θ updates) per horizon (default 50 for fagu/lgatt, 5 for pfagu).
        schedule: ``"per_step"`` (one θ per step, the thesis's ATT; default for fagu/lgatt) or
            ``"shared"`` (one per horizon; default for pfagu).
        last: the last step's rule, ``"carry"`` | ``"ste"`` | ``"extra_carry"`` | ``"extra_ste"``
            (default ``"carry"`` for T ≥ 2, ``"extra_ste"`` for T = 1; docs/design.md §3.3).
        warm_start: start each horizon from the previous one's learned schedule (default True)
            or from the initial values.
        final_pass: after the K replays, run the horizon once more with θ^K and keep it (default
            True); False keeps the weights of replay K−1.
        memory_budget: bytes a horizon may keep alive (recorded batches, schedule, snapshot,
            lgatt's trace), estimated up front; above it the first step raises
            :class:`HorizonMemoryError` (default: half the physical memory).
        recalibrate: ``recalibrate(model)`` called at the start of every horizon, before the
            snapshot, e.g. ``lambda m: metaste.recalibrate_bn(m, batches)`` (thesis 5.1).
        hyper_optimizer, hyper_optimizer_kwargs: as for ``delayed``, over the schedule tensors
            (default ``None``: θ ← θ − η_a·h).
    """

    default_replays: ClassVar[int] = 50
    default_schedule: ClassVar[str] = "per_step"

    horizon: int | None = None
    horizon_epochs: int | None = None
    steps_per_epoch: int | Sized | None = None
    replays: int | None = None
    schedule: str | None = None
    last: str | None = None
    warm_start: bool = True
    final_pass: bool = True
    memory_budget: float | None = None
    recalibrate: Callable[[nn.Module], Any] | None = None
    hyper_optimizer: HyperOptimizerSpec = None
    hyper_optimizer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        horizon, epochs, spe = self.horizon, self.horizon_epochs, self.steps_per_epoch
        if (horizon is None) == (epochs is None):
            raise ValueError(
                f"method={self.name!r} needs exactly one of horizon=T (steps) or horizon_epochs=E with "
                f"steps_per_epoch=len(loader); got horizon={horizon!r}, horizon_epochs={epochs!r}"
            )
        if epochs is not None:
            if not _is_int(epochs) or epochs < 1:
                raise ValueError(f"Invalid horizon_epochs: {epochs!r}; it must be an int >= 1")
            n = len(spe) if isinstance(spe, Sized) else spe
            if not _is_int(n) or n < 1:
                raise ValueError(
                    f"Invalid steps_per_epoch: {spe!r}; horizon_epochs needs an int >= 1 or a "
                    "data loader (its len() is used)"
                )
            horizon = epochs * n
        elif spe is not None:
            raise ValueError("steps_per_epoch applies to horizon_epochs=..., not to horizon=T (steps)")
        if not _is_int(horizon) or horizon < 1:
            raise ValueError(f"Invalid horizon: {horizon!r}; it must be an int >= 1 (steps)")
        replays = self.default_replays if self.replays is None else self.replays
        if not _is_int(replays) or replays < 1:
            raise ValueError(
                f"Invalid replays: {replays!r}; K must be an int >= 1 (replay 0 is the user's pass)"
            )
        schedule = self.default_schedule if self.schedule is None else self.schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {schedule!r}; choose one of {SCHEDULES}")
        last = ("carry" if horizon >= 2 else "extra_ste") if self.last is None else self.last
        if last not in LAST_RULES:
            raise ValueError(f"Invalid last: {last!r}; choose one of {LAST_RULES}")
        if horizon == 1 and last in ("carry", "ste"):
            raise ValueError(
                f"last={last!r} with horizon=1 leaves nothing to learn (θ_0 is tied/baseline and L_1 lies "
                "outside the horizon); use 'extra_ste' or 'extra_carry'"
            )
        for name in ("warm_start", "final_pass"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        budget = _default_budget() if self.memory_budget is None else self.memory_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(
                f"Invalid memory_budget: {self.memory_budget!r}; give bytes > 0 (math.inf: no limit)"
            )
        if self.recalibrate is not None and not callable(self.recalibrate):
            raise TypeError(
                f"recalibrate must be callable as recalibrate(model), got {type(self.recalibrate).__name__}"
            )
        resolved = dict(
            horizon=horizon, replays=replays, schedule=schedule, last=last, memory_budget=float(budget)
        )
        resolved["hyper_optimizer"] = resolve_hyper_optimizer(self.hyper_optimizer)
        resolved["hyper_optimizer_kwargs"] = dict(self.hyper_optimizer_kwargs or {})
        for k, v in resolved.items():
            object.__setattr__(self, k, v)

    @property
    def extra(self) -> bool:
        """Whether L_T is evaluated on one extra batch after the horizon's last step."""
        return self.last.startswith("extra")

    def check(self, optimizer: Optimizer, managed: list[ManagedWeight], model: nn.Module | None) -> None:
        if model is None:
            raise ValueError(
                f"method={self.name!r} needs model=: its buffers (e.g. BN running statistics) are part of "
                "the snapshot every replay starts from"
            )
