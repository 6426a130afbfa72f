"""Curriculum methods for ``metaste compare``: an STE variant (or FOGZO) trained under a
:class:`~metaste.QuantCurriculum` (docs/design.md §12). Named ``<base>+<curriculum>``, e.g.
``ste-identity+random``; options ``cur_length`` (T_c/T, default 0.5) and ``cur_schedule``
(default ``linear``), both tunable with ``--tune``."""

from __future__ import annotations

from torch import nn

from ..curriculum import CURRICULA, QuantCurriculum
from . import wrapper_methods  # noqa: F401  (registers fogzo, a base of the curriculum methods)
from .registry import METHODS, Method, RunContext, register_method

__all__ = ["CURRICULUM_BASES", "make_curriculum"]

CURRICULUM_BASES = ("ste", "ste-identity", "ste-pwl", "fogzo")
CURRICULUM_OPTIONS = ("cur_length", "cur_schedule")


def make_curriculum(name: str):
    """The factory a curriculum method hands the runner: the model's curriculum over the run."""

    def build(model: nn.Module, ctx: RunContext) -> QuantCurriculum:
        return QuantCurriculum(
            model,
            total_steps=ctx.total_steps,
            curriculum=name,
            length=float(ctx.extra.get("cur_length", 0.5)),
            schedule=str(ctx.extra.get("cur_schedule", "linear")),
            seed=ctx.seed,
        )

    return build


for _base in CURRICULUM_BASES:
    for _cur in CURRICULA:
        _parent = METHODS[_base]
        register_method(
            Method(
                f"{_base}+{_cur}",
                f"{_parent.name} under the '{_cur}' quantization curriculum (T_c = cur_length·T, "
                "docs/design.md §12)",
                _parent.quant,
                _parent.build,
                _parent.fwd_equiv,
                options=_parent.options + CURRICULUM_OPTIONS,
                curriculum=make_curriculum(_cur),
            )
        )
