"""BatchNorm re-estimation after quantization (docs/design.md §1 utilities).

Quantizing the weights shifts every pre-activation, so the running statistics learned in
float no longer match. :func:`recalibrate_bn` re-estimates them from data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_bn"]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` from ``batches``.

    Every ``_BatchNorm`` with ``track_running_stats`` (BatchNorm1d/2d/3d, SyncBatchNorm) is
    reset, then one pass over ``batches`` runs in train mode under ``no_grad`` with
    ``momentum=None``, i.e. the cumulative average over the K batches:

        running_mean = (1/K) Σ_k mean_k(x),   running_var = (1/K) Σ_k var_k(x)  (unbiased, per batch)

    Afterwards each BN gets its momentum back and every module its own original ``training``
    flag. Other train-mode side effects happen as in training (dropout masks; an activation
    quantizer that has not yet set its step sets it from the first batch). A quantization
    curriculum's mix is off during the pass: the statistics are those of the quantized weights
    the evaluation uses.

    Args:
        batches: an iterable of batches; a tuple/list batch ``(x, y, ...)`` feeds ``x``.
        forward: ``forward(model, batch)`` for other batch layouts.

    Returns:
        The number of batches seen. No batch raises ValueError; an exception in the pass (or
        that one) restores the previous statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    mixes = {
        m: (m.curriculum_mix, m.curriculum_bits)
        for m in model.modules()
        if getattr(m, "curriculum_mix", None) is not None or getattr(m, "curriculum_bits", None) is not None
    }
    saved = {bn: {k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bns}
    forward = forward or _default_forward
    seen = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for m in mixes:
            m.curriculum_mix = m.curriculum_bits = None
        for batch in batches:
            forward(model, batch)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn got no batches; the running statistics are left unchanged")
    except BaseException:
        for bn in bns:  # a failed pass leaves the previous statistics, not half-computed ones
            for k, v in saved[bn].items():
                getattr(bn, k).copy_(v)
        raise
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
        for m, (mix, bits) in mixes.items():
            m.curriculum_mix, m.curriculum_bits = mix, bits
    return seen
