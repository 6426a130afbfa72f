"""A slow, obvious FOGZO estimator (docs/design.md §4.3) that draws every z_i once and stores every d_i.

It shares only the noise contract with the fast one (``noise(kind, shape, derive_seed(seed, t,
i, k))`` and ``rademacher(seed, t, i)``), and performs each floating-point operation the fast
one performs, out of place and in the same order, so the two agree bitwise. It also returns
the textbook G = (1/n) Σ c_i d_i ⊘ ε for a tolerance check of the algebra.
"""

from __future__ import annotations

import math

import torch

from metaste.optim.core.noise import derive_seed, noise, rademacher


def reference_estimate(
    weights, grads, eps, kinds, loss_at, *, beta, n, seed, step, one_sided=False, loss0=None, restore="copy"
):
    """Returns (G, G_textbook, c, d) and leaves ``weights`` where the fast estimator leaves them."""
    total = 0.0
    for g, e in zip(grads, eps):
        if g is not None:
            nk = (
                float(torch.linalg.vector_norm(g)) * float(e)
                if e.numel() == 1
                else float(torch.linalg.vector_norm(g * e))
            )
            total += nk * nk
    norm = math.sqrt(total) if beta > 0 else 0.0
    inv_norm = 1.0 / norm if 0.0 < norm < math.inf else 0.0
    a, b = math.sqrt(beta) * inv_norm, math.sqrt(1.0 - beta)
    sig = [rademacher(seed, step, i) for i in range(n)]
    z = [
        [
            noise(kinds[k], v.shape, derive_seed(seed, step, i, k), v.device, v.dtype)
            for k, v in enumerate(weights)
        ]
        for i in range(n)
    ]
    # δ_i = ε ⊙ d_i with d_i = √β σ_i ĝ + √(1−β) z_i, ĝ = ε⊙g/N
    delta = []
    for i in range(n):
        row = []
        for k, v in enumerate(weights):
            g = grads[k]
            if b == 0.0:
                row.append(g * (eps[k] * eps[k] * (a * sig[i])) if g is not None else torch.zeros_like(v))
                continue
            w = z[i][k] * (eps[k] * b)
            if a != 0.0 and g is not None:
                w = w + (g * (a * sig[i])) * (eps[k] * eps[k])  # addcmul's order
            row.append(w)
        delta.append(row)
    d = [[delta[i][k] / eps[k] for k in range(len(weights))] for i in range(n)]

    def set_weights(values):
        for v, x in zip(weights, values):
            v.copy_(x)

    current = [v.clone() for v in weights]
    start = [v.clone() for v in weights]
    c = []
    for i in range(n):
        plus = [v + dl for v, dl in zip(current, delta[i])]
        set_weights(plus)
        lp = loss_at()
        if one_sided:
            c.append(lp - loss0)
            after = start if restore == "copy" else [p - dl for p, dl in zip(plus, delta[i])]
        else:
            if restore == "copy":
                minus = [torch.lerp(p, s, 2.0) for p, s in zip(plus, start)]
            else:
                minus = [torch.add(p, dl, alpha=-2.0) for p, dl in zip(plus, delta[i])]
            set_weights(minus)
            c.append((lp - loss_at()) / 2)
            after = start if restore == "copy" else [m + dl for m, dl in zip(minus, delta[i])]
        current = [x.clone() for x in after]
        set_weights(current)
    if not all(math.isfinite(ci) for ci in c):
        return None, None, c, d
    scale_g = a * sum(s * ci for s, ci in zip(sig, c)) / n
    G, textbook = [], []
    for k, v in enumerate(weights):
        Gk = grads[k] * scale_g if (grads[k] is not None and scale_g != 0.0) else torch.zeros_like(v)
        if b != 0.0:
            for i in range(n):
                Gk = Gk + (z[i][k] * (b * c[i] / n)) / eps[k]  # addcdiv's order
        G.append(Gk)
        textbook.append(sum(c[i] * d[i][k] for i in range(n)) / n / eps[k])
    return G, textbook, c, d
