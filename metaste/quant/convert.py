"""``quantize_model``: swap float layers for their quantized versions through a mapping
(docs/design.md §1). The settings are a :class:`~metaste.quant.config.QuantConfig`."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .config import QuantConfig, make_weight_quantizer
from .layers import QuantConv2d, QuantLayer, QuantLinear

__all__ = ["QuantConfig", "QUANT_MODULES", "register_quant_module", "quantize_model", "make_weight_quantizer"]

#: float module type → quantized class with ``from_float(module, config)``; exact types only
QUANT_MODULES: dict[type[nn.Module], type[QuantLayer]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def register_quant_module(float_cls: type[nn.Module], quant_cls: type[QuantLayer]) -> None:
    """Make :func:`quantize_model` swap modules of type ``float_cls`` (exactly) for
    ``quant_cls.from_float(module, config)``, e.g. a user's own layer type."""
    if not callable(getattr(quant_cls, "from_float", None)):
        raise TypeError(f"{quant_cls.__name__} needs a from_float(module, config) classmethod")
    QUANT_MODULES[float_cls] = quant_cls


def _last_layer_name(model: nn.Module, swappable: tuple[type[nn.Module], ...]) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, swappable)]
    return names[-1] if names else None


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    keep_last: bool = True,
    keep_fp: Iterable[str] | str = (),
    inplace: bool = False,
    mapping: Mapping[type[nn.Module], type[QuantLayer]] | None = None,
    **settings: Any,
) -> nn.Module:
    """Return ``model`` with every module whose exact type is in ``mapping`` (default
    :data:`QUANT_MODULES`: ``nn.Linear``/``nn.Conv2d`` → ``QuantLinear``/``QuantConv2d``) swapped
    for its quantized version (subclasses are left alone).

    ``config`` (a :class:`QuantConfig`) and/or its fields as keywords (``bits=2,
    surrogate="slste"``; keywords override ``config``) say how. Weights and biases are copied
    exactly; the global RNG state is left untouched. The last swappable layer (in
    ``named_modules`` order, i.e. registration order) stays in full precision unless
    ``keep_last=False`` (the thesis's setting); ``keep_fp`` names more modules to keep, e.g. the
    first layer — a single name or several; naming a container keeps everything inside it.
    ``inplace``: modify ``model`` instead of a deep copy.
    """
    config = (config or QuantConfig()).replace(**settings) if settings else (config or QuantConfig())
    mapping = QUANT_MODULES if mapping is None else mapping
    swappable = tuple(mapping)
    keep = {keep_fp} if isinstance(keep_fp, str) else set(keep_fp)
    names = {n for n, _ in model.named_modules()}
    missing = sorted(keep - names)
    if missing:
        layer_names = sorted(n for n, m in model.named_modules() if isinstance(m, swappable))
        raise ValueError(
            f"keep_fp names module(s) {missing} that the model does not have; "
            f"its Linear/Conv2d modules are {layer_names}"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if keep_last:
        last = _last_layer_name(model, swappable)
        if last is not None:
            keep.add(last)
    for name, module in list(model.named_modules()):
        if type(module) not in mapping or any(name == k or name.startswith(k + ".") for k in keep):
            continue
        _set_submodule(model, name, mapping[type(module)].from_float(module, config))
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("quantize_model needs a container model, not a bare Linear/Conv2d")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
