"""LSQ for activations (docs/design.md §1): a learned step size on an unsigned or signed grid,
picked from the first training batch, with the clipped STE in the backward."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ._functions import _RoundQuantFn
from .quantizers import S_EPS, GridSpecMixin, check_bits
from .surrogate_factory import make_surrogate

__all__ = ["ActivationLSQQuantizer"]


class ActivationLSQQuantizer(GridSpecMixin, nn.Module):
    """LSQ for activations: unsigned grid Qn = 0, Qp = 2^b − 1 (after a ReLU) or signed grid
    Qn = 2^(b−1), Qp = 2^(b−1) − 1; clipped STE backward; s learnable, initialised from the first
    training batch to 2·mean|x|/sqrt(Qp).

    ``signed=None`` (default) picks the grid from that first batch: signed if it has a negative
    value (raw inputs, LayerNorm outputs, a Linear after a Linear), else unsigned. The choice is a
    buffer, so it is saved in ``state_dict()``.
    """

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if bits == 1 and signed:
            raise ValueError("a signed 1-bit activation grid is degenerate; use bits >= 2")
        self.s = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self._auto_signed = signed is None
        self.surrogate = make_surrogate("ste")
        self.defer_surrogate = False

    @property
    def qn(self) -> int:
        return 2 ** (self.bits - 1) if bool(self.signed) else 0

    @property
    def qp(self) -> int:
        return 2 ** (self.bits - 1) - 1 if bool(self.signed) else 2**self.bits - 1

    def grid_spec(self) -> str:
        return f"act_lsq:bits={self.bits}"

    def forward_written(self) -> list[Tensor]:
        """What the next forward may write besides the buffers: ``s``, until the first training
        batch has set it (the wrappers' step guard restores it if the step fails)."""
        return [] if bool(self.initialized) else [self.s]

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError(
                    "activation quantizer used in eval mode before any training batch set its "
                    "step size; run one forward in train mode (or recalibrate) first"
                )
            with torch.no_grad():
                if self._auto_signed:
                    self.signed.fill_(bool((x < 0).any()) and self.bits > 1)
                elif not bool(self.signed) and bool((x < 0).any()):
                    warnings.warn(
                        f"unsigned {self.bits}-bit activation quantizer got negative inputs (min "
                        f"{x.min().item():.3g}); they are clipped to 0. Use signed=None/True, or keep "
                        "the layer that reads them in full precision (keep_fp=[name]).",
                        stacklevel=2,
                    )
                self.s.copy_(2 * x.detach().abs().mean() / math.sqrt(self.qp) + S_EPS)
                self.initialized.fill_(True)
        qn, qp = self.qn, self.qp
        gscale = 1.0 / math.sqrt(x[0].numel() * qp) if x.dim() > 1 else 1.0
        return _RoundQuantFn.apply(x, self.s.clamp(min=S_EPS), qn, qp, self, gscale)

    def extra_repr(self) -> str:
        mode = "auto" if self._auto_signed else ("signed" if bool(self.signed) else "unsigned")
        return f"bits={self.bits}, grid={mode}"
