"""The up-front memory estimate of a HyperSTE horizon (docs/design.md §3.3): what one horizon keeps
alive, checked against ``memory_budget`` before the horizon changes anything."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..core.closure import Closure
from ..core.snapshot import Snapshot, captured_bytes
from .horizon_options import HorizonOptions

__all__ = ["HorizonMemory", "HorizonMemoryError"]


class HorizonMemoryError(MemoryError):
    """A horizon's up-front memory estimate exceeds ``memory_budget``; nothing was changed."""


class HorizonMemory:
    """The memory part of :class:`~.horizon.HorizonMethod`: :meth:`estimate_memory` and the
    budget check; a method adds its own storage in :meth:`_method_memory`."""

    opts: HorizonOptions
    model: nn.Module
    name: str
    schedule: list
    memory_estimate: dict[str, int]
    _capture: Callable[[bool], Snapshot]  # HorizonMethod's snapshot of the state a replay restores

    def estimate_memory(self, closures: Sequence[Closure]) -> dict[str, int]:
        """Up-front estimate (bytes) of what one horizon keeps alive (docs/design.md §3.3): recorded batches
        (tensors captured by the closures, the first one's times T if only it is known), the
        schedule and its hypergradient, the snapshot S and the method's per-step storage. The
        optimizer state is counted as it is now (before the first step of a run, Adam's moments
        do not exist yet and are not counted)."""
        T = self.opts.horizon
        own = {
            t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())
        }
        batches = sum(captured_bytes(c, own) for c in closures)
        if len(closures) < T:
            batches = batches * T // max(1, len(closures))
        sched = 2 * sum(s.numel() * s.element_size() for s in self.schedule)
        snap = self._capture(with_rng=False).nbytes()
        out = {"batches": batches, "schedule": sched, "snapshot": snap}
        out.update(self._method_memory(snap))
        out["total"] = sum(out.values())
        return out

    def _method_memory(self, snap_bytes: int) -> dict[str, int]:
        """The method's own storage per horizon (bytes, by name), given the snapshot's size."""
        raise NotImplementedError

    def _check_memory(self, closures: Sequence[Closure]) -> dict[str, int]:
        """The estimate of :meth:`estimate_memory`; raises if it is above the budget."""
        est = self.estimate_memory(closures)
        budget = self.opts.memory_budget
        if est["total"] > budget:
            self.memory_estimate = est  # what the error explains, kept for the user to read
            mib = 2.0**20
            parts = ", ".join(f"{k} {v / mib:.1f} MiB" for k, v in est.items() if k != "total")
            raise HorizonMemoryError(
                f"HyperSTE(method={self.name!r}): a horizon of T={self.opts.horizon} steps needs about "
                f"{est['total'] / mib:.1f} MiB ({parts}), above memory_budget={budget / mib:.1f} MiB. "
                "Use a shorter horizon, schedule='shared', smaller batches, or raise memory_budget"
            )
        return est
