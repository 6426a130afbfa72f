"""Quantized layers: ``QuantLinear`` and ``QuantConv2d`` (docs/design.md §1).

Each is the float layer with a weight quantizer (and optionally an input-activation quantizer)
applied in ``forward``; ``weight``/``bias`` keep their names, so a float ``state_dict`` loads
into the weights of a quantized model. Building a layer registers its weight in the parameter
registry (:mod:`metaste.quant.registry`), which is how optimizer wrappers find ``s``, the grid
and the surrogate from the parameter alone.

``from_float(module, config)`` builds the quantized layer from a float one (lsq-net style):
:func:`~metaste.quant.convert.quantize_model` swaps modules through a mapping
``{nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}`` of such classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .activation import ActivationLSQQuantizer
from .config import QuantConfig, make_weight_quantizer
from .quantizers import Quantizer, check_grid
from .registry import register

__all__ = ["QuantLinear", "QuantConv2d", "QuantLayer", "float_layer_kwargs"]


def float_layer_kwargs(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``module``'s shape (an ``nn.Linear`` or
    ``nn.Conv2d``, or a subclass): what a quantized or an integer layer copies from its source."""
    if isinstance(module, nn.Linear):
        return dict(
            in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None
        )
    if isinstance(module, nn.Conv2d):
        return dict(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    raise TypeError(f"no constructor arguments known for {type(module).__name__}")


class QuantLayer:
    """Mixin: ``weight_quant`` (a :class:`Quantizer`) and optional ``act_quant``."""

    weight: nn.Parameter
    weight_quant: Quantizer
    act_quant: ActivationLSQQuantizer | None

    def _attach(self, weight_quant: Quantizer, act_quant: ActivationLSQQuantizer | None) -> None:
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        register(self.weight, self.weight_quant)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # check the grids before this layer's weight is copied (the quantizers check again)
        check_grid(self.weight_quant, state_dict, prefix + "weight_quant.")
        if self.act_quant is not None:
            check_grid(self.act_quant, state_dict, prefix + "act_quant.")
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def __setstate__(self, state: dict) -> None:
        # deepcopy / pickle make a new weight Parameter: register it too
        super().__setstate__(state)  # type: ignore[misc]
        register(self.weight, self.weight_quant)

    #: a quantization curriculum's mix m (metaste.QuantCurriculum): in training the forward weight
    #: is lerp(v, Q(v), m) — v where m = 0, Q(v) where m = 1, exactly; None: Q(v)
    curriculum_mix: Tensor | None = None
    #: a bit-width curriculum's current bit width (finer than the quantizer's); None: its own
    curriculum_bits: int | None = None

    def quantized_weight(self) -> Tensor:
        if not self.training:
            return self.weight_quant(self.weight)
        if self.curriculum_bits is not None:
            q = self.weight_quant.at_bits(self.weight, self.curriculum_bits)
        else:
            q = self.weight_quant(self.weight)
        m = self.curriculum_mix
        return q if m is None else torch.lerp(self.weight, q, m)

    def _quant_input(self, x: Tensor) -> Tensor:
        x = x if self.act_quant is None else self.act_quant(x)
        ema = self.weight_quant.input_moment_ema
        if ema is not None and self.training:
            self._record_input_moment(x, ema)
        return x

    def _record_input_moment(self, x: Tensor, ema: float) -> None:
        """E[x_j²] per weight column j, added to ``weight_quant.input_moment_pending`` (folded into
        the EMA once per step; no forward hook: a flag the forward reads, so a compiled model keeps
        one graph; docs/design.md §8)."""
        q = self.weight_quant
        with torch.no_grad():
            m = self._column_moment(x.detach())
            pending = q.input_moment_pending
            if pending is None or pending[0].shape != m.shape:
                q.input_moment_pending = (m, 1)
            else:
                q.input_moment_pending = (pending[0] + m, pending[1] + 1)

    def _column_moment(self, x: Tensor) -> Tensor:
        """E[x_j²] over everything but the input feature (Linear: shape (in,))."""
        return x.reshape(-1, x.shape[-1]).square().mean(0)

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig | None = None) -> nn.Module:
        """The quantized version of the float ``module``: same shape, same mode, its weight and
        bias copied exactly, a weight quantizer built by ``config`` (and an input quantizer if
        ``config.act_bits``). Draws no random numbers from the caller's stream."""
        config = config or QuantConfig()
        w = module.weight
        wq = make_weight_quantizer(w, config)
        aq = ActivationLSQQuantizer(config.act_bits).to(w.device) if config.act_bits else None
        # the layer constructor runs reset_parameters (random init, overwritten below): fork the RNG
        # so that quantizing a model does not shift the caller's random stream
        with torch.random.fork_rng(
            devices=[w.device] if w.device.type != "cpu" else [], device_type=w.device.type
        ):
            new = cls(
                **float_layer_kwargs(module), weight_quant=wq, act_quant=aq, device=w.device, dtype=w.dtype
            )
        new.weight.data.copy_(w.data)
        new.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            new.bias.data.copy_(module.bias.data)
        new.train(module.training)
        return new


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weights: y = x̂ Ŵᵀ + b."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_quant: Quantizer,
        bias: bool = True,
        act_quant: ActivationLSQQuantizer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._attach(weight_quant, act_quant)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        weight_quant: Quantizer,
        act_quant: ActivationLSQQuantizer | None = None,
        **conv_kwargs: Any,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **conv_kwargs)
        self._attach(weight_quant, act_quant)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)

    def _column_moment(self, x: Tensor) -> Tensor:
        """The input channel's E[x²] over the batch and the spatial positions (padding not
        counted), repeated over kh·kw: the columns of the weight flattened to (out, in/groups·kh·kw)
        — shape (in·kh·kw,), or (out, in/groups·kh·kw) for a grouped convolution."""
        c = self.in_channels
        m = x.reshape(-1, c, x.shape[-2] * x.shape[-1]).square().mean((0, 2))
        khkw = self.kernel_size[0] * self.kernel_size[1]
        if self.groups == 1:
            return m.repeat_interleave(khkw)
        per_group = m.view(self.groups, c // self.groups)
        return per_group.repeat_interleave(self.out_channels // self.groups, 0).repeat_interleave(khkw, 1)
