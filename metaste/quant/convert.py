"""``quantize_model``: swap float layers for their quantized versions through a mapping
(docs/design.md §1). The settings are a :class:`~metaste.quant.config.QuantConfig`."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .config import QuantConfig
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .registry import record_root, register

__all__ = ["QUANT_MODULES", "register_quant_module", "quantize_model"]

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

    * Already quantized layers are *re-quantized* with the new settings (from their latent
      weights; a learned step size starts again from its initialisation): quantizing twice gives
      the second call's bits. ``keep_fp`` leaves such a layer as it is.
    * Tied weights stay tied: layers that share a weight share the new latent ``Parameter`` and
      one quantizer; a module used at several places is swapped once; a float module (kept, or
      of another type) that shares a parameter with a quantized layer keeps sharing it.
    * A call that quantizes nothing warns with the reason (subclasses of Linear/Conv2d from
      another library, the only layer kept as the last one, everything in ``keep_fp``).
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
    last = _last_layer_name(model, swappable) if keep_last else None
    if last is not None:
        keep.add(last)

    def target(module: nn.Module) -> type[QuantLayer] | None:
        if isinstance(module, QuantLayer):
            return type(module)  # re-quantize with the new settings
        return mapping.get(type(module))

    new_of: dict[int, nn.Module] = {}  # id(old module) -> its quantized version
    param_new: dict[int, nn.Parameter] = {}  # id(old parameter) -> the new one (ties)
    quantizer_of: dict[int, nn.Module] = {}  # id(old weight) -> its quantizer (tied weights share it)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        cls = target(module)
        if cls is None or any(name == k or name.startswith(k + ".") for k in keep):
            continue
        new = new_of.get(id(module))
        if new is None:
            new = cls.from_float(module, config)
            _keep_ties(module, new, param_new, quantizer_of)
            new_of[id(module)] = new
        _set_submodule(model, name, new)
    if param_new:  # float modules that share a parameter with a swapped one share the new one
        for m in model.modules():
            for pname, p in list(m._parameters.items()):
                if p is not None and id(p) in param_new:
                    m._parameters[pname] = param_new[id(p)]
    if not new_of:
        warnings.warn(_nothing_quantized(model, mapping, keep, last), UserWarning, stacklevel=2)
    record_root(model)
    return model


def _keep_ties(
    old: nn.Module, new: nn.Module, param_new: dict[int, nn.Parameter], quantizer_of: dict[int, nn.Module]
) -> None:
    """Give ``new`` the parameters (and weight quantizer) already made for parameters ``old``
    shares with a module swapped before; record its own otherwise."""
    for pname, p in list(old._parameters.items()):
        if p is None or pname not in new._parameters:
            continue
        if id(p) in param_new:
            new._parameters[pname] = param_new[id(p)]
        else:
            param_new[id(p)] = new._parameters[pname]
    wq = getattr(new, "weight_quant", None)
    if wq is not None:
        shared = quantizer_of.setdefault(id(old.weight), wq)
        if shared is not wq:
            new.weight_quant = shared
        register(new.weight, shared)


def _nothing_quantized(
    model: nn.Module, mapping: Mapping[type[nn.Module], type[QuantLayer]], keep: set[str], last: str | None
) -> str:
    swappable = tuple(mapping)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, swappable)]
    exact = [n for n, m in layers if type(m) in mapping]
    subclasses = {n: type(m) for n, m in layers if type(m) not in mapping and not isinstance(m, QuantLayer)}
    head = "quantize_model quantized nothing: "
    if not exact:
        if subclasses:
            kinds = sorted({f"{c.__module__}.{c.__qualname__}" for c in subclasses.values()})
            return head + (
                f"the model's Linear/Conv2d-like modules {sorted(subclasses)} are subclasses ({', '.join(kinds)}), "
                "which it leaves alone (exact types only). If another library already fake-quantizes "
                "them, train them with metaste.FOGZO(..., scales={weight: step_size}); otherwise map the "
                "type: metaste.quant.register_quant_module(TheirLinear, metaste.QuantLinear) or "
                "quantize_model(..., mapping={TheirLinear: metaste.QuantLinear, ...})"
            )
        return head + f"the model has no module of the types {[c.__name__ for c in mapping]}"
    if exact == [last]:
        return head + (
            f"the model's only Linear/Conv2d layer {last!r} is the last one, which keep_last=True keeps "
            "in full precision; pass keep_last=False to quantize it"
        )
    return head + f"every Linear/Conv2d layer {exact} is kept in full precision by keep_fp={sorted(keep)}"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("quantize_model needs a container model, not a bare Linear/Conv2d")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
