"""A hash of every wrapper's trajectory over its main configurations, eager and compiled: run it
before and after a change that must not move any number (a refactor), and compare the lines.

    OMP_NUM_THREADS=1 python benchmarks/trajectory_hash.py > before.txt   # on the old commit
    OMP_NUM_THREADS=1 python benchmarks/trajectory_hash.py > after.txt    # on the new one
    diff before.txt after.txt

Each line is one run: 4 steps of a wrapper on a 256-300-10 MLP (large enough for the compiled
passes), hashing the losses, the parameters and the buffers. Only the public API is used, so the
script runs on any version of the package.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools

import torch
import torch.nn.functional as F
from torch import nn

import metaste
import metaste._compile as compile_runner


def _model(bits: int, **quant) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 10))
    return metaste.quantize_model(net, bits=bits, **quant)


def _hash(model: nn.Module, make_opt, steps: int = 4) -> str:
    opt = make_opt(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
    h = hashlib.sha256()
    for _ in range(steps):
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
        h.update(repr(float(loss)).encode())
    for t in [*model.parameters(), *model.buffers()]:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _sgd(model: nn.Module, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)


def runs():
    """(name, model builder, optimizer builder) of every configuration."""
    for restore, n, one_sided, keep in itertools.product(
        ["copy", "inplace"], [1, 3], [False, True], [False, True]
    ):
        kw = dict(restore=restore, n=n, one_sided=one_sided, keep_noise=keep, total_steps=4, beta_min=0.5)
        yield f"fogzo {kw}", lambda: _model(2), lambda m, kw=kw: metaste.FOGZO(_sgd(m, 0.9), **kw)
    yield (
        "fogzo binary approxsign n=2",
        lambda: _model(1, quantizer="dorefa", surrogate="approxsign"),
        lambda m: metaste.FOGZO(_sgd(m, 0.9), n=2, total_steps=4),
    )
    for beta_min in (0.0, 1.0):
        yield (
            f"fogzo beta_min={beta_min}",
            lambda: _model(2),
            lambda m, b=beta_min: metaste.FOGZO(_sgd(m, 0.9), beta_min=b, total_steps=4),
        )
    for kw in ({}, {"boundary": "none"}, {"resolve": "threshold"}):
        yield (
            f"hyperste analytical {kw}",
            lambda: _model(2, surrogate="slste"),
            lambda m, kw=kw: metaste.HyperSTE(_sgd(m), method="analytical", model=m, **kw),
        )
    for surrogate in ("slste", "dlste"):
        yield (
            f"hyperste delayed {surrogate}",
            lambda s=surrogate: _model(2, surrogate=s),
            lambda m: metaste.HyperSTE(_sgd(m, 0.9), method="delayed", model=m),
        )
    yield "pege", lambda: _model(2), lambda m: metaste.PEGE(_sgd(m, 0.9), total_steps=4, model=m)
    for vr in ("none", "storm"):
        yield (
            f"jacquant vr={vr}",
            lambda: _model(2, quantizer="lsq"),
            lambda m, vr=vr: metaste.JacQuant(_sgd(m, 0.9), vr=vr, every=2, flip_rate=1.0),
        )
    yield (
        "calibrated",
        lambda: _model(2, surrogate="leaky", granularity="tensor"),
        lambda m: metaste.Calibrated(_sgd(m), every=2),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run only the configurations whose name contains this")
    args = p.parse_args()
    torch.set_num_threads(1)
    for compiled in (False, True):
        compile_runner.ENABLED = compiled
        for name, model, opt in runs():
            if args.only in name:
                print(f"{'compiled' if compiled else 'eager':8s} {name}: {_hash(model(), opt)}", flush=True)


if __name__ == "__main__":
    main()
