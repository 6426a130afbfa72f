"""The machinery every metaste optimizer wrapper runs on (docs/design.md §5): the step protocol
and its base class (:mod:`.wrapper`), checkpoints (:mod:`.checkpoint`), the closure contract
(:mod:`.closure`), snapshots and buffer guards (:mod:`.snapshot`, :mod:`.modules`), the
zeroth-order passes (:mod:`.probe`) and their counter-based noise (:mod:`.noise`), fp16 scaling,
clipping and accumulation (:mod:`.amp`), FSDP2 shards (:mod:`.fsdp`) and one-transfer host reads
(:mod:`.host`). Nothing here knows a method; the methods live beside this package."""

from .amp import Accumulated
from .closure import NonFiniteLossError
from .wrapper import OptimizerWrapper

__all__ = ["Accumulated", "NonFiniteLossError", "OptimizerWrapper"]
