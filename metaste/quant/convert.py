"""``quantize_model``: swap ``nn.Linear``/``nn.Conv2d`` for their quantized versions (docs/design.md §1)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .layers import QuantConv2d, QuantLinear
from .quantizers import (
    QUANTIZERS,
    ActivationLSQQuantizer,
    DoReFaBinaryQuantizer,
    FixedScaleQuantizer,
    LSQQuantizer,
    Quantizer,
    check_bits,
    check_weight_dtype,
)
from .surrogates import A_MAX_DEFAULT, A_MIN_DEFAULT, make_surrogate

__all__ = ["quantize_model", "make_weight_quantizer"]

_SWAPPABLE = (nn.Linear, nn.Conv2d)


def make_weight_quantizer(
    weight,
    *,
    bits: int,
    quantizer: str = "lsq",
    surrogate: str = "ste",
    surrogate_kwargs: dict | None = None,
    per_channel: bool = False,
    granularity: str = "element",
    a_min: float = A_MIN_DEFAULT,
    a_max: float = A_MAX_DEFAULT,
    boundary: str = "none",
    binary_surrogate_scale: str = "E",
    fixed_init: str | float = "max",
) -> Quantizer:
    """Build the weight quantizer (with its surrogate) for one weight tensor."""
    check_bits(bits)
    check_weight_dtype(weight)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"Unknown quantizer {quantizer!r}; valid choices are {QUANTIZERS}")
    binary = bits == 1
    if binary and quantizer != "dorefa":
        raise ValueError(f"bits=1 needs quantizer='dorefa' (got {quantizer!r})")
    if quantizer == "dorefa" and not binary:
        raise ValueError(f"quantizer='dorefa' is the 1-bit quantizer; got bits={bits}")
    psi = make_surrogate(
        surrogate,
        tuple(weight.shape),
        binary=binary,
        granularity=granularity,
        a_min=a_min,
        a_max=a_max,
        boundary=boundary,
        dtype=weight.dtype,
        **(surrogate_kwargs or {}),
    )
    psi.to(device=weight.device)
    if quantizer == "dorefa":
        return DoReFaBinaryQuantizer(psi, binary_surrogate_scale)
    if quantizer == "lsq":
        return LSQQuantizer(weight, bits, psi, per_channel)
    return FixedScaleQuantizer(weight, bits, psi, per_channel, init=fixed_init)


def _last_layer_name(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, _SWAPPABLE)]
    return names[-1] if names else None


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 2,
    quantizer: str = "lsq",
    surrogate: str = "ste",
    surrogate_kwargs: dict | None = None,
    per_channel: bool = False,
    granularity: str = "element",
    a_min: float = A_MIN_DEFAULT,
    a_max: float = A_MAX_DEFAULT,
    boundary: str = "none",
    binary_surrogate_scale: str = "E",
    fixed_init: str | float = "max",
    act_bits: int | None = None,
    keep_last: bool = True,
    keep_fp: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with every ``nn.Linear``/``nn.Conv2d`` swapped for ``QuantLinear``/
    ``QuantConv2d`` (exact types only; subclasses are left alone).

    Weights and biases are copied exactly; the global RNG state is left untouched (building the
    new layers draws no random numbers from the caller's stream). The last such layer (in
    ``named_modules`` order, i.e. registration order) stays in full precision unless
    ``keep_last=False`` (the thesis's setting); ``keep_fp`` names more modules to keep, e.g. the
    first layer — a single name or several; naming a container keeps everything inside it.

    Args:
        bits: weight bits, 1..16 (1 = DoReFa binary, needs ``quantizer="dorefa"``).
        quantizer: ``"lsq"`` (learnable step), ``"fixed"`` (frozen step) or ``"dorefa"``.
        fixed_init: the frozen step of ``quantizer="fixed"``: ``"max"`` (max|v|/Qp), ``"lsq"``
            (the LSQ init 2·mean|v|/√Qp, the FOGZO paper's MNIST set-up) or a float.
        surrogate: a name of :data:`metaste.quant.surrogates.SURROGATES`; ``surrogate_kwargs``
            passes ``h`` to ``fd`` or ``temperature`` to ``tanh``.
        per_channel: one step per output channel (LSQ/fixed).
        granularity, a_min, a_max, boundary: learnable-surrogate settings (docs/design.md §2).
        binary_surrogate_scale: DoReFa's surrogate argument, ``"E"`` (v/mean|v|) or ``"one"``.
        act_bits: if set, each quantized layer also quantizes its input with unsigned LSQ
            (put it after a ReLU).
        inplace: modify ``model`` instead of a deep copy.
    """
    check_bits(bits)
    if act_bits is not None:
        check_bits(act_bits)
    keep = {keep_fp} if isinstance(keep_fp, str) else set(keep_fp)
    names = {n for n, _ in model.named_modules()}
    missing = sorted(keep - names)
    if missing:
        layer_names = sorted(n for n, m in model.named_modules() if isinstance(m, _SWAPPABLE))
        raise ValueError(
            f"keep_fp names module(s) {missing} that the model does not have; "
            f"its Linear/Conv2d modules are {layer_names}"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if keep_last:
        last = _last_layer_name(model)
        if last is not None:
            keep.add(last)
    qkw = dict(
        bits=bits,
        quantizer=quantizer,
        surrogate=surrogate,
        surrogate_kwargs=surrogate_kwargs,
        per_channel=per_channel,
        granularity=granularity,
        a_min=a_min,
        a_max=a_max,
        boundary=boundary,
        binary_surrogate_scale=binary_surrogate_scale,
        fixed_init=fixed_init,
    )
    for name, module in list(model.named_modules()):
        if type(module) not in _SWAPPABLE or any(name == k or name.startswith(k + ".") for k in keep):
            continue
        wq = make_weight_quantizer(module.weight, **qkw)
        aq = ActivationLSQQuantizer(act_bits).to(module.weight.device) if act_bits else None
        new = _swap(module, wq, aq)
        _set_submodule(model, name, new)
    return model


def _swap(module: nn.Module, wq: Quantizer, aq: ActivationLSQQuantizer | None) -> nn.Module:
    device = module.weight.device
    # the layer constructors run reset_parameters (random init, overwritten below): fork the RNG
    # so that quantizing a model does not shift the caller's random stream
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        return _build_swapped(module, wq, aq)


def _build_swapped(module: nn.Module, wq: Quantizer, aq: ActivationLSQQuantizer | None) -> nn.Module:
    factory = dict(device=module.weight.device, dtype=module.weight.dtype)
    has_bias = module.bias is not None
    if type(module) is nn.Linear:
        new = QuantLinear(module.in_features, module.out_features, wq, has_bias, aq, **factory)
    else:
        new = QuantConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            wq,
            aq,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=has_bias,
            padding_mode=module.padding_mode,
            **factory,
        )
    with_grad = module.weight.requires_grad
    new.weight.data.copy_(module.weight.data)
    new.weight.requires_grad_(with_grad)
    if has_bias:
        new.bias.data.copy_(module.bias.data)
    new.train(module.training)
    return new


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("quantize_model needs a container model, not a bare Linear/Conv2d")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
