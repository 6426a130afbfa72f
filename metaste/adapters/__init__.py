"""Models fake-quantized by other libraries (docs/design.md §10.6): find their quantized weights with
live step sizes and STE kinds, in the form of FOGZO's ``scales=``::

    model = ...  # torchao: quantize_(model, QATConfig(base_config, step="prepare")); brevitas: QuantLinear/QuantConv2d
    opt = metaste.FOGZO(torch.optim.AdamW(model.parameters()), total_steps=T, scales=metaste.adapters.scales_from(model))

:func:`torchao` reads ``FakeQuantizedLinear`` / ``FakeQuantizedEmbedding`` modules with an
``IntxFakeQuantizer`` weight quantizer (extra ``[torchao]``); :func:`brevitas` reads every layer
with a ``quant_weight()`` (``QuantLinear``, ``QuantConv1d/2d/3d``, …; extra ``[brevitas]``);
:func:`scales_from` uses whichever library the model's modules come from. Each returns
``{weight: (step_size_fn, ste_kind)}``; ``step_size_fn()`` recomputes s from the current weight
the way the library's forward does (so it is right before the first forward and after every
update). HyperSTE learns ψ inside metaste's own quantizers, which these models do not have: it
raises an error that says so: the adapters mark the weights they read in the parameter registry
(:func:`metaste.quant.registry.mark_foreign`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..quant.registry import foreign_libraries, mark_foreign

__all__ = ["scales_from", "torchao", "brevitas", "Scales"]

Scales = dict[nn.Parameter, tuple[Callable[[], Tensor], str]]


def torchao(model: nn.Module) -> Scales:
    """The fake-quantized weights of a torchao ``QATConfig(..., step="prepare")`` model."""
    from ._torchao import scales

    return _remember(scales(model), "torchao")


def brevitas(model: nn.Module) -> Scales:
    """The quantized weights of a brevitas model (``QuantLinear``, ``QuantConv2d``, …)."""
    from ._brevitas import scales

    return _remember(scales(model), "brevitas")


def scales_from(model: nn.Module) -> Scales:
    """:func:`torchao` or :func:`brevitas`, whichever library the model's modules come from."""
    libs = foreign_libraries(model, ())
    if not libs:
        raise ValueError(
            f"metaste.adapters.scales_from found no torchao or brevitas module in {type(model).__name__}: it "
            "looks for torchao's FakeQuantizedLinear/FakeQuantizedEmbedding (quantize_(model, "
            "QATConfig(base_config, step='prepare'))) and brevitas layers with quant_weight() "
            "(brevitas.nn.QuantLinear, QuantConv2d). A model quantized with metaste.quantize_model needs no "
            "adapter: FOGZO finds its weights itself"
        )
    out: Scales = {}
    if "torchao" in libs:
        out.update(torchao(model))
    if "brevitas" in libs:
        out.update(brevitas(model))
    return out


def _remember(found: Scales, library: str) -> Scales:
    for w in found:
        mark_foreign(w, library)
    return found
