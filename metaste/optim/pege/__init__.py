"""PEGE, progressive element-wise gradient estimation (docs/design.md §7): the wrapper
(:mod:`.optimizer`) and its element-wise passes (:mod:`.passes`)."""

from .optimizer import PEGE

__all__ = ["PEGE"]
