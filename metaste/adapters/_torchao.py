"""torchao 0.18 QAT (``quantize_(model, QATConfig(base_config, step="prepare"))``): the weights of
``FakeQuantizedLinear`` / ``FakeQuantizedEmbedding`` with an ``IntxFakeQuantizer``.

s per element: torchao's weight fake-quantizer is per group (``PerGroup(g)``) or per output
channel (``PerAxis(0)``, a group of the whole row); its scale has one value per (row, group), and
is recomputed from the current weight in every forward when ``is_dynamic`` (the default) — by the
same torchao function called here (``get_group_qparams_symmetric`` or, asymmetric,
``get_groupwise_affine_qparams``), so ``s()`` is right before torchao's first forward too. A
static scale that a forward has set (or range learning's parameter) is read as it is. STE kind:
``"identity"`` (round on an integer grid)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..integrations import require

_ao = require("torchao", "torchao", "metaste.adapters.torchao")
from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: E402
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # noqa: E402
from torchao.quantization.quant_primitives import _DTYPE_TO_BIT_WIDTH  # noqa: E402
from torchao.quantization.utils import get_group_qparams_symmetric, get_groupwise_affine_qparams  # noqa: E402


def scales(model: nn.Module) -> dict[nn.Parameter, tuple[Callable[[], Tensor], str]]:
    out, other = {}, []
    for name, m in model.named_modules():
        fq = getattr(m, "weight_fake_quantizer", None)
        if fq is None or not isinstance(getattr(m, "weight", None), nn.Parameter):
            continue
        if not isinstance(fq, IntxFakeQuantizer) or not isinstance(
            fq.config.granularity, (PerAxis, PerGroup)
        ):
            other.append(f"{name} ({type(fq).__name__}, {getattr(fq, 'config', None)})")
            continue
        if not fq.enabled:
            continue
        out[m.weight] = (_scale_fn(m.weight, fq), "identity")
    if not out:
        raise ValueError(
            f"metaste.adapters.torchao found no fake-quantized weight in {type(model).__name__}: it looks for "
            "modules with a weight_fake_quantizer that is an enabled IntxFakeQuantizer with PerGroup or PerAxis "
            "granularity — what quantize_(model, QATConfig(base_config, step='prepare')) makes of nn.Linear and "
            "nn.Embedding with an integer weight config"
            + (f"; found unsupported ones: {', '.join(other)}" if other else "; found none")
        )
    return out


def _scale_fn(weight: nn.Parameter, fq: IntxFakeQuantizer) -> Callable[[], Tensor]:
    cfg = fq.config
    bits = _DTYPE_TO_BIT_WIDTH[cfg.dtype]

    def s() -> Tensor:
        w = weight.detach()
        group = w.shape[-1] if isinstance(cfg.granularity, PerAxis) else cfg.granularity.group_size
        if cfg.is_dynamic or fq.scale is None:
            with torch.no_grad():
                if cfg.is_symmetric:
                    scale, _ = get_group_qparams_symmetric(w, bits, group, cfg.scale_precision, eps=cfg.eps)
                else:
                    scale, _ = get_groupwise_affine_qparams(w, bits, group, cfg.scale_precision, eps=cfg.eps)
        else:
            scale = fq.scale.detach()
        scale = scale.reshape(w.shape[0], -1).to(w.dtype)
        if scale.shape[1] == 1:
            return scale  # per row: broadcasts to (rows, columns)
        return scale.repeat_interleave(group, dim=1)  # per group → per element

    return s
