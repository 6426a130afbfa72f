"""Plots for ``metaste compare`` and the examples (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..quant.registry import quantized_weights

__all__ = ["plot_surrogates"]


def plot_surrogates(model: nn.Module, path: str | Path, title: str = "") -> Path:
    """Write a PNG of the learned surrogate parameters, one row per quantized layer with a
    learnable surrogate (docs/design.md §3.5): left, the histogram of each parameter (``a``; ``a_n``/``a_p``
    for DLSTE) over [a_min, a_max]; right, ψ(u) at the mean parameter next to the baseline
    (a = 1: the clipped STE for SLSTE, the PWL STE for PLSTE/DLSTE). Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [(n, e) for n, e in quantized_weights(model) if getattr(e.surrogate, "learnable", False)]
    if not rows:
        raise ValueError("plot_surrogates: the model has no quantized weight with a learnable surrogate")
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 2.2 * len(rows)), squeeze=False)
    for (name, e), (ax_h, ax_p) in zip(rows, axes):
        s = e.surrogate
        for pname, t in zip(s.param_names, s.params()):
            ax_h.hist(
                t.detach().flatten().cpu().double().numpy(),
                bins=40,
                range=(s.a_min, s.a_max),
                alpha=0.6,
                label=pname,
            )
        ax_h.set_title(f"{name}: {s.name}, {s.granularity}", fontsize=8)
        ax_h.legend(fontsize=7)
        u = torch.linspace(-1.5 * e.qn, 1.5 * e.qp, 601, dtype=torch.float64)
        mean = [t.detach().double().mean().reshape(()).cpu() for t in s.params()]
        ones = [torch.ones((), dtype=torch.float64) for _ in mean]
        ax_p.plot(u, s.psi(u, e.qn, e.qp, ones), "k--", lw=1, label="baseline (a = 1)")
        ax_p.plot(
            u, s.psi(u, e.qn, e.qp, mean), lw=1.5, label="at mean " + ", ".join(f"{x:.3g}" for x in mean)
        )
        ax_p.set_xlabel("u = v / s", fontsize=7)
        ax_p.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
