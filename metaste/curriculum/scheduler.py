"""``QuantCurriculum``: a quantization curriculum used like an LR scheduler (docs/design.md §12).

    cur = metaste.QuantCurriculum(model, total_steps=T, curriculum="random", length=0.5)
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        cur.step()

It works with any optimizer and any gradient rule, because it changes only what the training
forward sees: each quantized layer's weight becomes ``torch.lerp(v, Q(v), m)``, with m from the
strategy (:mod:`.strategies`) and the schedule ρ(t) (:mod:`.schedules`). Evaluation (``eval()``)
and every step from T_c = round(length·T) on use the plain quantized forward, bit for bit. The
mixes are tensors updated in place, so ``torch.compile(model)`` keeps its graph while they change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..quant.layers import QuantLayer
from ..quant.registry import QuantEntry, claim_all, lookup, release
from .schedules import SCHEDULES, ratio
from .strategies import CURRICULA

__all__ = ["QuantCurriculum"]


class QuantCurriculum:
    r"""Which weights a training forward sees quantized, step by step.

    Args:
        model: a model quantized with :func:`metaste.quantize_model`.
        total_steps (int): T, the run's length.
        curriculum (str): ``"random"``, ``"nested"``, ``"switch"``, ``"blend"``, ``"noise"``,
            ``"nearest"`` or ``"bits"`` (:mod:`metaste.curriculum.strategies`).
        length (float in [0, 1], default 0.5): T_c / T. 0: no curriculum (the plain quantized
            model from the first step, bit for bit).
        schedule (``"linear"`` | ``"cosine"`` | ``"log"`` | ``"step"``, default ``"linear"``): ρ(t).
        k (float ≥ 0, default 9): the ``log`` schedule's curvature; stages (int ≥ 1, default 4):
            the ``step`` schedule's.
        every (int ≥ 1, default 1): ``nearest`` re-ranks the elements every ``every`` steps.
        ladder (default (8, 4)): the finer bit widths ``bits`` trains on before the weight's own.
        seed (int): the masks' stream.

    ``state_dict()`` / ``load_state_dict()`` resume it exactly (the step; ``nearest``'s current
    masks). :meth:`remove` gives the model back as a plain quantized model.

    The gradient law is the estimator's: v gets (1 − m)·g + m·ψ·g with the quantizer's ψ. Under a
    wrapper that applies its own ψ after backward (HyperSTE, JacQuant), ψ multiplies the whole
    gradient, float elements included: the curriculum changes their forward only. PEGE has its
    own curriculum and refuses a second one on the same weights (and this one refuses PEGE's).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        curriculum: str = "random",
        length: float = 0.5,
        schedule: str = "linear",
        k: float = 9.0,
        stages: int = 4,
        every: int = 1,
        ladder: tuple[int, ...] = (8, 4),
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"QuantCurriculum takes the quantized model, got {type(model).__name__}")
        for name, value, low in (("total_steps", total_steps, 1), ("stages", stages, 1), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: {value!r}; it must be an int >= {low}")
        if curriculum not in CURRICULA:
            raise ValueError(f"Unknown curriculum {curriculum!r}; choose one of {tuple(CURRICULA)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule {schedule!r}; choose one of {SCHEDULES}")
        if not (isinstance(length, (int, float)) and 0.0 <= length <= 1.0):
            raise ValueError(f"Invalid length: {length!r}; it must lie in [0, 1] (a fraction of total_steps)")
        if not (isinstance(k, (int, float)) and k >= 0 and k < float("inf")):
            raise ValueError(f"Invalid k: {k!r}; it must be finite and >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.layers = _quantized_layers(model)
        self.total_steps, self.length, self.schedule = total_steps, float(length), schedule
        self.curriculum, self.k, self.stages, self.seed = curriculum, float(k), stages, seed
        if not ladder or any(
            isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in ladder
        ):
            raise ValueError(f"Invalid ladder: {ladder!r}; bit widths (ints in [2, 16]), e.g. (8, 4)")
        self.strategy = CURRICULA[curriculum](
            seed=seed, every=every, ladder=tuple(sorted(ladder, reverse=True))
        )
        for _, entry in self.layers:
            self.strategy.check(entry)
        self.curriculum_steps = int(round(self.length * total_steps))
        self.t = 0
        self.released = False
        claim_all([entry.quantizer for _, entry in self.layers], "forward", self)
        self._mixes: dict[int, Tensor] = {}  # weight index → the mix tensor the layers hold
        self._apply()

    # -- the schedule --------------------------------------------------------------------------

    def ratio(self, t: int | None = None) -> float:
        """ρ(t), the quantized fraction (or weight) at step t (default: the current step)."""
        t = self.t if t is None else t
        return ratio(t, self.curriculum_steps, self.schedule, k=self.k, stages=self.stages)

    def step(self) -> None:
        """Advance to the next step (call it after each optimizer step)."""
        if self.released:
            raise RuntimeError("this QuantCurriculum was removed (remove()); it cannot step again")
        self.t += 1
        self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        rho = self.ratio()
        if rho >= 1.0:
            self._set_all(None)
            return
        if self.strategy.sets == "bits":
            for layer, entry in self.layers:
                layer.curriculum_bits = self.strategy.bits(entry, rho)
            return
        if self._mixes and self.t % self.strategy.every != 0:
            return  # ``nearest`` keeps its ranking between re-rankings
        for index, (layers, entry) in enumerate(self._by_weight()):
            m = self.strategy.mix(entry, index, rho, self.t)
            held = self._mixes.get(index)
            if held is not None and held.shape == m.shape:
                held.copy_(m)  # in place: a compiled model sees the same tensor
            else:
                self._mixes[index] = held = m
            for layer in layers:
                layer.curriculum_mix = held

    def _set_all(self, value: Tensor | None) -> None:
        for layer, _ in self.layers:
            layer.curriculum_mix = value
            layer.curriculum_bits = None
        self._mixes.clear()

    def _by_weight(self) -> list[tuple[list[nn.Module], QuantEntry]]:
        """The layers of each distinct weight (tied weights share one mask), in model order."""
        out: dict[int, tuple[list[nn.Module], QuantEntry]] = {}
        for layer, entry in self.layers:
            out.setdefault(id(entry.weight), ([], entry))[0].append(layer)
        return list(out.values())

    def remove(self) -> None:
        """The plain quantized model again; this curriculum cannot step any more."""
        self._set_all(None)
        for _, entry in self.layers:
            release(entry.quantizer, "forward", self)
        self.released = True

    # -- checkpoints ---------------------------------------------------------------------------

    SETTINGS = ("total_steps", "curriculum", "length", "schedule", "k", "stages", "seed")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.SETTINGS}
        out["every"] = self.strategy.every
        out["t"] = self.t
        if self.strategy.every > 1:  # a ranking made at an earlier step cannot be redrawn
            out["mixes"] = {i: m.clone() for i, m in self._mixes.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step; the settings must match the constructor's."""
        diff = [k for k in self.SETTINGS if k in state and state[k] != getattr(self, k)]
        if diff:
            raise ValueError(
                "this QuantCurriculum state was saved with other settings: "
                + ", ".join(f"{k}={state[k]!r} (constructor: {getattr(self, k)!r})" for k in diff)
            )
        t = state["t"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"Invalid state: t={t!r}")
        self.t = t
        self._mixes.clear()
        saved = state.get("mixes")
        if saved is not None and self.ratio() < 1.0:
            for index, (layers, _) in enumerate(self._by_weight()):
                self._mixes[index] = saved[index].clone()
                for layer in layers:
                    layer.curriculum_mix = self._mixes[index]
        else:
            self._apply()

    def __repr__(self) -> str:
        return (
            f"QuantCurriculum({self.curriculum!r}, T_c={self.curriculum_steps} of {self.total_steps}, "
            f"schedule={self.schedule!r}, t={self.t})"
        )


def _quantized_layers(model: nn.Module) -> list[tuple[nn.Module, QuantEntry]]:
    out = []
    for m in model.modules():
        if isinstance(m, QuantLayer):
            entry = lookup(m.weight)
            if entry is None:
                continue
            if type(m.weight).__name__ == "DTensor" or hasattr(m.weight, "device_mesh"):
                raise NotImplementedError(
                    "QuantCurriculum draws whole-tensor masks and does not run on FSDP2-sharded weights yet; "
                    "use it on one process or under DDP"
                )
            out.append((m, entry))
    if not out:
        raise ValueError(
            "QuantCurriculum found no quantized layer in the model; quantize it first with "
            "metaste.quantize_model(model, bits=...)"
        )
    return out
