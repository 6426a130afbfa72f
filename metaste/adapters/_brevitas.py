"""brevitas 0.13: every layer with a weight quantizer (``QuantLinear``, ``QuantConv1d/2d/3d``,
``QuantConvTranspose*``, ``QuantEmbedding`` …), through the layer's own ``quant_weight()`` — the
``IntQuantTensor`` its forward uses — so s is the live one (statistics of the current weight, or
a learned scale) and broadcasts to the weight (per tensor: a scalar; per channel: (C, 1, …)).
STE kind: ``"identity"`` for integer grids, ``"hardtanh"`` for binary (bit width 1: sign)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..integrations import require

_bv = require("brevitas", "brevitas", "metaste.adapters.brevitas")


def scales(model: nn.Module) -> dict[nn.Parameter, tuple[Callable[[], Tensor], str]]:
    out, other = {}, []
    for name, m in model.named_modules():
        if not type(m).__module__.startswith("brevitas") or not callable(getattr(m, "quant_weight", None)):
            continue
        weight = getattr(m, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if not getattr(m, "is_weight_quant_enabled", True):
            other.append(f"{name} (weight quantization disabled)")
            continue
        with torch.no_grad():
            qw = m.quant_weight()
        if getattr(qw, "scale", None) is None or getattr(qw, "bit_width", None) is None:
            other.append(f"{name} ({type(qw).__name__} without an integer scale)")
            continue
        kind = "hardtanh" if float(qw.bit_width) == 1 else "identity"
        out[weight] = (_scale_fn(m), kind)
    if not out:
        raise ValueError(
            f"metaste.adapters.brevitas found no quantized weight in {type(model).__name__}: it looks for "
            "brevitas layers whose quant_weight() is an integer QuantTensor with a scale and a bit width "
            "(brevitas.nn.QuantLinear, QuantConv2d, ... with a weight quantizer)"
            + (f"; found unsupported ones: {', '.join(other)}" if other else "; found none")
        )
    return out


def _scale_fn(layer: nn.Module) -> Callable[[], Tensor]:
    def s() -> Tensor:
        with torch.no_grad():
            return layer.quant_weight().scale.detach()

    return s
