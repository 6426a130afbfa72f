"""The peer a user would pick instead of metaste: torchao's PARQ (``torchao.prototype.parq``),
registered as methods of ``metaste compare`` so that it runs through the same protocol (data,
initialisation, batch order, lr tuning, verdicts).

PARQ quantizes by its own means: the model stays float, and ``QuantOptimizer`` keeps the
latent weights in its state and writes the proximal map of each update into the parameters.
The weights PARQ quantizes are exactly those ``quantize_model`` would quantize with the run's
settings (the last layer kept float unless ``keep_last=false``; ``keep_fp``), in one param group
with ``quant_bits``; the grid is torchao's ``UnifQuantizer`` (symmetric, 2^b levels, range from
the mean |w|; one range per tensor like metaste's LSQ, or per channel with ``per_channel=true``).

* ``parq-hard``: ``ProxHardQuant`` (the STE of the proximal view: hard quantization every step);
* ``parq``: ``ProxPARQ``, annealed from the identity to hard quantization over a fraction
  ``anneal`` of the run (default the whole run; steepness 10);
* ``parq-binaryrelax``: ``ProxBinaryRelax``, the linear blend of latent and quantized weights
  annealed over the same span.

Every evaluation sees hard-quantized weights: :func:`hard_quantized` rounds each quantized
weight to the nearest point of PARQ's current grid (a no-op once PARQ itself is hard) for the
evaluation and puts the weights back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from ..quant.convert import quantize_model
from ..quant.layers import QuantLayer
from .registry import Method, RunContext, base_optimizer, register_method

__all__ = ["PARQ_METHODS", "quantized_weight_names", "hard_quantized"]

PARQ_METHODS = ("parq-hard", "parq", "parq-binaryrelax")
_INSTALL = "pip install 'metaste[torchao]'"
_OPTIONS = ("per_channel", "quant_period")


def _parq():
    try:
        from torchao.prototype import parq
    except ImportError as e:
        raise ImportError(f"the PARQ methods need torchao's PARQ: {_INSTALL} ({e})") from e
    return parq


def quantized_weight_names(model: nn.Module, quant: dict) -> list[str]:
    """The modules whose weight ``quantize_model(model, **quant)`` would quantize."""
    probe = quantize_model(model, **quant)  # a deep copy: ``model`` is left as it is
    return [n for n, m in probe.named_modules() if isinstance(m, QuantLayer)]


def _build(prox: str):
    def build(model: nn.Module, ctx: RunContext) -> Optimizer:
        parq = _parq()
        bits = int(ctx.quant["bits"])
        weights = [model.get_submodule(n).weight for n in quantized_weight_names(model, ctx.quant)]
        ids = {id(w) for w in weights}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}, {"params": weights, "quant_bits": bits}]
        base = base_optimizer(model, ctx, params=[g for g in groups if g["params"]])
        end = max(1, int(round(float(ctx.extra.get("anneal", 1.0)) * ctx.total_steps)))
        maps = {
            "parq-hard": lambda: parq.ProxHardQuant(),
            "parq": lambda: parq.ProxPARQ(anneal_start=0, anneal_end=end, steepness=10.0),
            "parq-binaryrelax": lambda: parq.ProxBinaryRelax(anneal_start=0, anneal_end=end),
        }
        return parq.QuantOptimizer(
            base,
            parq.UnifQuantizer(),
            maps[prox](),
            quant_period=int(ctx.extra.get("quant_period", 10)),
            quant_per_channel=bool(ctx.extra.get("per_channel", False)),
        )

    return build


@contextlib.contextmanager
def hard_quantized(model: nn.Module, opt: Optimizer) -> Iterator[None]:
    """Inside: every weight PARQ quantizes holds its nearest point of PARQ's grid (the grid PARQ
    last computed; before PARQ's first step, the quantizer's grid of the weight as it is)."""
    parq = _parq()
    saved = []
    with torch.no_grad():
        for group in opt.regularized_param_groups():
            b = group["quant_bits"]
            for p in group["params"]:
                saved.append((p, p.detach().clone()))
                per_channel = opt.quant_per_channel and p.dim() > 1
                view = p.flatten(start_dim=1) if per_channel else p
                dim = -1 if per_channel else None
                quants = opt.state[p].get("quants") if p in opt.state else None
                if quants is None:
                    view.copy_(opt.quantizer.quantize(view, b, dim=dim)[0])
                else:
                    parq.ProxHardQuant().apply_(view, None, quants, 0, dim=dim)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


for _name, _what in (
    ("parq-hard", "ProxHardQuant: hard quantization after every update"),
    (
        "parq",
        "ProxPARQ: piecewise-affine prox annealed to hard quantization over a fraction `anneal` of the run",
    ),
    (
        "parq-binaryrelax",
        "ProxBinaryRelax: latent/quantized blend annealed over a fraction `anneal` of the run",
    ),
):
    register_method(
        Method(
            _name,
            f"torchao PARQ QuantOptimizer, UnifQuantizer, {_what} (peer; needs {_INSTALL}); "
            "3 forward equivalents per step",
            {},
            _build(_name),
            options=_OPTIONS + (() if _name == "parq-hard" else ("anneal",)),
            substrate=False,
            eval_view=hard_quantized,
            available=_parq,
        )
    )
