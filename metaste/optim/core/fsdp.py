"""FOGZO on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank works
on its own shard (docs/design.md §10.4).

After ``fully_shard`` a layer's ``weight`` is a new ``DTensor`` parameter (``Shard(0)`` over a 1-D
mesh): metaste's registry, keyed by the old ``Parameter``, no longer knows it, so call
:func:`register_sharded` (or shard with :func:`fully_shard`, which does both). FOGZO then
perturbs each rank's rows in place (FSDP2 all-gathers the perturbed shards in the next forward),
draws the noise of exactly those elements (the counter-based noise at their global indices,
:func:`~metaste.optim.core.noise.noise_slice`, so the union of the shards' noise is the
single-process noise), sums the
partial ‖ε ⊙ g‖² over the mesh and averages the c_i over the ranks; the gradient shards are
already the batch mean (FSDP2's reduce-scatter). The step sizes s are gathered when they are
sharded themselves (LSQ's ``s`` is a parameter too) and cut to the rank's rows.

HyperSTE's per-step methods use the same pieces: :func:`shard_rows_like` shards a per-row or
per-element surrogate parameter θ like its weight, :func:`local` gives the rank's rows of θ, of
the weight and of its gradient, :func:`as_dtensor_like` hands the surrogate gradient back as a
DTensor, and the sums over a sharded tensor are summed over :func:`shard_group`
(:func:`all_reduce_sums`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...quant.layers import QuantLayer
from ...quant.registry import register

__all__ = [
    "fully_shard",
    "register_sharded",
    "is_dtensor",
    "local",
    "global_offset",
    "local_scale",
    "mesh_group",
    "shard_group",
    "shard_rows_like",
    "as_dtensor_like",
    "gather",
    "all_reduce_sum",
    "all_reduce_sums",
]


def _dtensor_cls() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The rank's shard of a DTensor (a view: in-place changes reach the parameter), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _check_placement(p: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    if (
        p.device_mesh.ndim != 1
        or not isinstance(p.placements[0], (Shard, Replicate))
        or (isinstance(p.placements[0], Shard) and p.placements[0].dim != 0)
    ):
        raise NotImplementedError(
            f"metaste's FSDP2 path handles weights sharded on dim 0 over a 1-D mesh (fully_shard's "
            f"default); got placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
        )


def _row_start(p: Tensor) -> int:
    from torch.distributed.tensor import Shard

    if not isinstance(p.placements[0], Shard):
        return 0
    rows = p.shape[0]
    chunk = -(-rows // p.device_mesh.size())  # torch.chunk: ceil(rows / world) rows per rank
    return min(p.device_mesh.get_local_rank() * chunk, rows)


def global_offset(p: Tensor) -> int:
    """Flat offset of the rank's shard in the full tensor (0 for a plain tensor)."""
    if not is_dtensor(p):
        return 0
    _check_placement(p)
    return _row_start(p) * (p.numel() // p.shape[0] if p.shape[0] else 0)


def local_scale(s: Tensor | float, p: Tensor) -> Tensor | float:
    """The step size s cut to the rows of the rank's shard of ``p`` (gathered first if s is a
    DTensor); a per-tensor s is returned whole."""
    if is_dtensor(s):
        s = s.full_tensor()
    if not is_dtensor(p) or not isinstance(s, Tensor) or s.dim() == 0 or s.shape[0] != p.shape[0]:
        return s
    rows = local(p).shape[0]
    start = _row_start(p)
    return s[start : start + rows]


def mesh_group(p: Tensor) -> Any:
    return p.device_mesh.get_group()


def all_reduce_sum(value: float, group: Any, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return float(t)


def all_reduce_sums(values: list[float], group: Any, device: torch.device) -> list[float]:
    """Each value summed over the ranks of ``group`` (one float64 all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def shard_group(p: Tensor) -> Any:
    """The process group over which the rows of ``p`` are sharded (FSDP2's ``Shard(0)``), or
    ``None`` for a tensor every rank holds whole (a plain tensor, a ``Replicate`` DTensor)."""
    from torch.distributed.tensor import Shard

    if not is_dtensor(p):
        return None
    _check_placement(p)
    return mesh_group(p) if isinstance(p.placements[0], Shard) else None


def shard_rows_like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` — whole and the same on every rank, with one entry per row of ``p`` or more
    (``t.shape[0] == p.shape[0]``: a per-element or per-channel surrogate parameter) — as a
    DTensor sharded like ``p``'s rows; each rank keeps its rows (no communication). Any other
    ``t`` (0-dim, per-tensor, already a DTensor, ``p`` not sharded) is returned as it is."""
    if shard_group(p) is None or is_dtensor(t) or t.dim() == 0 or t.shape[0] != p.shape[0]:
        return t
    start, rows = _row_start(p), local(p).shape[0]
    return as_dtensor_like(t[start : start + rows].clone(), p, shape=t.shape, stride=t.stride())


def as_dtensor_like(t: Tensor, p: Tensor, shape: Any = None, stride: Any = None) -> Tensor:
    """The rank's shard ``t`` as a DTensor placed like ``p`` (global ``shape``/``stride``:
    ``p``'s unless given); no communication."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t,
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=p.shape if shape is None else shape,
        stride=p.stride() if stride is None else stride,
    )


def gather(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def reshard(modules: list[nn.Module]) -> None:
    """Reshard every FSDP2 module in ``modules``. A forward without backward leaves the root
    module (``reshard_after_forward=False``) unsharded, its parameters the gathered copies: the
    next perturbation of the shards, or the optimizer's update, would not reach them."""
    from torch.distributed.fsdp import FSDPModule

    for top in modules:
        for m in top.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def register_sharded(model: nn.Module) -> nn.Module:
    """Register the (new, sharded) weight of every metaste quantized layer of ``model`` with its
    quantizer; call it after ``fully_shard``. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            register(m.weight, m.weight_quant)
    return model


def fully_shard(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.distributed.fsdp.fully_shard`` on every metaste quantized layer and then on the
    root (keywords such as ``mesh=`` go to each call), and :func:`register_sharded`. A 0-dim
    parameter of a quantized layer (LSQ's per-tensor s), which FSDP2 refuses, becomes shape (1,)
    first (same value; it broadcasts the same). Build the optimizer afterwards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard as shard

    if "mesh" not in kwargs and not dist.is_initialized():
        raise RuntimeError(
            "metaste.optim.fully_shard needs torch.distributed initialised (dist.init_process_group) "
            "or a mesh= argument; the model was not changed"
        )
    for m in list(model.modules()):  # FSDP2 refuses 0-dim parameters (LSQ's per-tensor s): make them (1,)
        if isinstance(m, QuantLayer):
            for q in m.modules():
                for p in q.parameters(recurse=False):
                    if p.dim() == 0:  # in place: the Parameter object (and an optimizer's reference) stays
                        p.data = p.data.reshape(1)
    for m in list(model.modules()):
        if isinstance(m, QuantLayer) and m is not model:
            shard(m, **kwargs)
    shard(model, **kwargs)
    return register_sharded(model)
