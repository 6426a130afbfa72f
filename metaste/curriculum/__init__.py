"""Quantization curricula (docs/design.md §12): :class:`QuantCurriculum` and its strategies."""

from .scheduler import QuantCurriculum
from .schedules import SCHEDULES, ratio
from .strategies import CURRICULA, Curriculum, register_curriculum

__all__ = ["QuantCurriculum", "CURRICULA", "Curriculum", "register_curriculum", "SCHEDULES", "ratio"]
