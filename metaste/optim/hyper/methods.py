"""The HyperSTE methods by name (``HyperSTE(opt, method="delayed")``): each name to its options class."""

from ._options import MethodOptions
from .analytical import Analytical
from .delayed import Delayed
from .fagu import FAGU, PFAGU
from .lgatt import LGATT

__all__ = ["METHODS"]

METHODS: dict[str, type[MethodOptions]] = {cls.name: cls for cls in (Analytical, Delayed, FAGU, PFAGU, LGATT)}
