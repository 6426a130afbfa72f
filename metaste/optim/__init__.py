"""Optimizer wrappers: FOGZO (SPEC §4) and HyperSTE (SPEC §3)."""

from ._wrapper import NonFiniteLossError, OptimizerWrapper

__all__ = ["NonFiniteLossError", "OptimizerWrapper"]
