"""Optimizer wrappers: FOGZO (SPEC §4) and HyperSTE (SPEC §3)."""

from ._wrapper import NonFiniteLossError, OptimizerWrapper
from .fogzo import FOGZO
from .hyper.horizon import HorizonMemoryError
from .hyperste import HyperSTE

__all__ = ["FOGZO", "HorizonMemoryError", "HyperSTE", "NonFiniteLossError", "OptimizerWrapper"]
