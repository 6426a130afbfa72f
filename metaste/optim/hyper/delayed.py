"""``method="delayed"``: θ frozen over windows of k steps, one-step hypergradients from inside the
window applied at the next window (thesis A.2, SPEC §3.2). Any optimizer, any learnable ψ,
any granularity; the update's derivative comes from :mod:`metaste.optim.diffopt`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ...quant.surrogates import psi_differentiable
from ..diffopt import UpdateRecord, differentiable_update, record_update
from ._common import HyperMethod, HyperOptions, ManagedWeight

__all__ = ["Delayed"]


class Delayed(HyperMethod):
    """Step t at position j = t mod k of its window [w, w+k−1] (SPEC §3.2)::

        λ_t = g_t ⊙ ψ(u_t; θ)                              (p.grad for the base step)
        if a pair (t−1, t) was recorded:                   (θ_t = θ_{t−1} inside the window)
            h += ⟨λ_t, ∂v_t/∂θ⟩   via diffopt: v_t(θ) = OPT(v_{t−1}, g_{t−1} ⊙ ψ(u_{t−1}; θ))
        record step t if j < k−1 and (accumulate != "first" or j = 0)
        base step
        if j = k−1:  θ ← clamp(hyper_opt step on h (÷(k−1) for "mean"), a_min, a_max)

    The record holds v_t, g_t, u_t and the optimizer state before step t (no graph), so a
    checkpoint between two steps of a window resumes exactly.
    """

    name = "delayed"
    default_boundary = "none"

    def __init__(self, optimizer: Optimizer, managed: list[ManagedWeight], opts: HyperOptions) -> None:
        super().__init__(optimizer, managed, opts)
        # the hyper-optimizer trains leaf copies of the surrogate buffers; the buffers stay the truth
        self.leaves = [t.detach().clone() for t in self.tensors]
        factory = opts.hyper_optimizer or torch.optim.SGD
        self.hyper_opt = factory(self.leaves, lr=opts.hyper_lr, **opts.hyper_optimizer_kwargs)
        # pending pair: (update record, raw grads g_t, u_t, indices into managed) or None
        self.pending: tuple[UpdateRecord, list[Tensor], list[Tensor], list[int]] | None = None
        self.h: list[Tensor] = [torch.zeros_like(t) for t in self.tensors]
        self.pairs = 0
        self.skipped = 0  # windows whose hypergradient was not finite (θ left unchanged)
        self.hypergrad: list[Tensor] = [torch.zeros_like(t) for t in self.tensors]  # last applied h

    def _slices(self) -> list[slice]:
        out, k = [], 0
        for mw in self.managed:
            n = len(mw.surrogate.param_names)
            out.append(slice(k, k + n))
            k += n
        return out

    def _pair_hypergradient(self, lam: dict[int, Tensor]) -> None:
        """h += ⟨λ_t, ∂v_t/∂θ⟩ for the pending pair (t−1, t)."""
        record, grads, us, idx = self.pending
        slices = self._slices()
        thetas, diff_grads = [], []
        for i, g, u in zip(idx, grads, us):
            mw = self.managed[i]
            theta = [t.detach().clone().requires_grad_() for t in mw.surrogate.params()]
            thetas.append(theta)
            diff_grads.append(g * psi_differentiable(mw.surrogate, u, mw.qn, mw.qp, theta))
        v_next = differentiable_update(record, diff_grads)
        keep = [j for j, i in enumerate(idx) if i in lam]  # weights with a gradient at step t too
        flat = [t for j in keep for t in thetas[j]]
        hs = torch.autograd.grad(
            [v_next[j] for j in keep], flat, grad_outputs=[lam[idx[j]] for j in keep], allow_unused=True
        )
        it = iter(hs)
        for j in keep:
            for k in range(slices[idx[j]].start, slices[idx[j]].stop):
                h = next(it)
                if h is not None:
                    self.h[k] += h
        self.pairs += 1

    def before_update(self, step: int) -> None:
        o = self.opts
        pos = step % o.window
        lam: dict[int, Tensor] = {}
        raw: dict[int, tuple[Tensor, Tensor]] = {}
        self.step_stats = {}
        for i, mw in enumerate(self.managed):
            g = mw.param.grad
            if g is None:  # weight not used by this loss: the base optimizer skips it too
                continue
            u = mw.u()
            psi = mw.surrogate.psi(u, mw.qn, mw.qp)
            lam[i] = g * psi
            raw[i] = (g, u)
            self.step_stats[mw.name] = {"clipped_frac": float((psi == 0).sum()) / g.numel()}
        if self.pending is not None:
            self._pair_hypergradient(lam)
        for i, mw in enumerate(self.managed):
            if i in lam:
                mw.param.grad = lam[i]
        if pos < o.window - 1 and (o.accumulate != "first" or pos == 0):
            idx = sorted(raw)
            record = record_update(self.optimizer, [self.managed[i].param for i in idx])
            self.pending = (record, [raw[i][0] for i in idx], [raw[i][1] for i in idx], idx)
        else:
            self.pending = None

    def after_update(self, step: int) -> None:
        if step % self.opts.window != self.opts.window - 1:
            return
        h = [x / self.pairs for x in self.h] if self.opts.accumulate == "mean" and self.pairs else self.h
        self.hypergrad = h
        self.hypergrad_norm = float(sum(float((x.double() ** 2).sum()) for x in h)) ** 0.5
        if all(bool(torch.isfinite(x).all()) for x in h):
            self._hyper_step(h)
        else:
            self.skipped += 1
        self.h = [torch.zeros_like(t) for t in self.tensors]
        self.pairs = 0

    @torch.no_grad()
    def _hyper_step(self, h: list[Tensor]) -> None:
        """θ ← clamp(θ − η_a·h) by the hyper-optimizer, on leaf copies synced from the buffers."""
        for k, (leaf, t, x) in enumerate(zip(self.leaves, self.tensors, h)):
            leaf.copy_(t)
            eta = self.hyper_lr(k, x)
            # the hyper-optimizer's lr is hyper_lr; normalisation rescales the gradient it sees
            scale = eta / self.opts.hyper_lr if self.opts.hyper_lr > 0 else 0.0
            leaf.grad = x * scale
        self.hyper_opt.step()
        for mw, sl in zip(self.managed, self._slices()):
            s = mw.surrogate
            for leaf, t in zip(self.leaves[sl], self.tensors[sl]):
                leaf.clamp_(s.a_min, s.a_max)
                t.copy_(leaf)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["hyper_opt"] = self.hyper_opt.state_dict()
        sd["h"], sd["pairs"], sd["skipped"], sd["hypergrad"] = (
            self.h,
            self.pairs,
            self.skipped,
            self.hypergrad,
        )
        if self.pending is not None:
            record, grads, us, idx = self.pending
            sd["pending"] = {"record": record.state_dict(), "grads": grads, "u": us, "idx": idx}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.hyper_opt.load_state_dict(sd["hyper_opt"])
        self.h = [t.clone() for t in sd["h"]]  # accumulated in place: never alias the caller's dict
        self.pairs, self.skipped = sd["pairs"], sd["skipped"]
        self.hypergrad = list(sd["hypergrad"])
        p = sd.get("pending")
        self.pending = (
            None
            if p is None
            else (
                UpdateRecord.from_state_dict(type(self.optimizer), p["record"]),
                list(p["grads"]),
                list(p["u"]),
                list(p["idx"]),
            )
        )
