"""Per-step time of PEGE, JacQuant, the calibrated surrogate and torchao's PARQ relative to plain
STE, measured interleaved in one process, CPU time, one thread (docs/methods/*.md "Cost")::

    OMP_NUM_THREADS=1 python benchmarks/bench_new_methods.py [--model mlp|wide] [--steps N] [--rounds R]

``mlp``: the FOGZO paper's MLP 784-10-10, batch 64; ``wide``: MLP 784-512-512-10, batch 256; both
layers 2-bit LSQ. ``jacquant-storm-nophase``: STORM with flip_rate = 1 (no phase boundary, so the
second pass at the previous weights runs every step). ``sgd-float``: the float model with plain
SGD, the step PARQ's ``QuantOptimizer`` (``parq``, ``parq-hard``: its proximal map after each SGD
step, on the same float model) wraps; they run where the ``[torchao]`` extra is installed."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402,F401  (puts the checkout's metaste, or $METASTE_PATH's, first on sys.path)

import metaste  # noqa: E402
from metaste.bench import models  # noqa: E402
from metaste.bench.registry import METHODS, RunContext  # noqa: E402

MODELS = {"mlp": ((784, 10, 10), 64), "wide": ((784, 512, 512, 10), 256)}


def builders(steps, sizes):
    def make(surrogate="ste", **kw):
        torch.manual_seed(0)
        net = models.mlp(sizes)
        return metaste.quantize_model(
            net, bits=2, quantizer="lsq", surrogate=surrogate, keep_last=False, **kw
        )

    def ste():
        m = make()
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    def pege():
        m = make()
        return m, metaste.PEGE(torch.optim.SGD(m.parameters(), lr=0.1), total_steps=steps, model=m)

    def jacquant(vr, **kw):
        def b():
            m = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return m, metaste.JacQuant(torch.optim.SGD(m.parameters(), lr=0.1), vr=vr, **kw)

        return b

    def calibrated():
        m = make("leaky", granularity="tensor")
        return m, metaste.Calibrated(torch.optim.SGD(m.parameters(), lr=0.1), every=10, n=1)

    def float_model():
        torch.manual_seed(0)
        return models.mlp(sizes)

    def sgd_float():
        m = float_model()
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    def parq(name):
        def b():
            m = float_model()
            ctx = RunContext("sgd", 0.1, steps, 0, quant={"bits": 2, "quantizer": "lsq", "keep_last": False})
            return m, METHODS[name].build(m, ctx)

        return b

    out = {"ste": ste, "pege": pege, "jacquant": jacquant("none"), "jacquant-storm": jacquant("storm"),
           "jacquant-storm-nophase": jacquant("storm", flip_rate=1.0), "calibrated": calibrated,
           "sgd-float": sgd_float}  # fmt: skip
    if _parq_available():
        out |= {"parq-hard": parq("parq-hard"), "parq": parq("parq")}
    return out


def _parq_available() -> bool:
    try:
        METHODS["parq"].available()
    except ImportError:
        return False
    return True


def measure(model: str, steps: int, rounds: int) -> dict:
    """name → per-round ms per step and the round-by-round ratio to plain STE (``ratio``) and,
    for PARQ, to plain SGD on the same float model (``ratio_sgd``)."""
    torch.set_num_threads(1)
    sizes, batch = MODELS[model]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def run(net, opt, n: int) -> None:
        for _ in range(n):
            if isinstance(opt, metaste.optim.OptimizerWrapper):
                opt.step(lambda m=net: F.cross_entropy(m(x), y))
            else:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()

    for build in builders(steps, sizes).values():  # untimed: the compiled passes compile here
        run(*build(), 2)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved: every method once per round
        for name, build in builders(steps, sizes).items():
            net, opt = build()
            t0 = time.process_time()
            run(net, opt, steps)
            times.setdefault(name, []).append((time.process_time() - t0) / steps)
    out = {}
    for name, ts in times.items():  # ratios round by round
        out[name] = {"ms": [1e3 * t for t in ts], "ratio": [t / s for t, s in zip(ts, times["ste"])]}
        if name.startswith("parq"):
            out[name]["ratio_sgd"] = [t / s for t, s in zip(ts, times["sgd-float"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=tuple(MODELS), default="mlp")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sizes, batch = MODELS[args.model]
    print(
        f"{args.model}: MLP {'-'.join(map(str, sizes))}, batch {batch}, {args.rounds} rounds x {args.steps} steps"
    )
    for name, r in measure(args.model, args.steps, args.rounds).items():
        q = r["ratio"]
        print(f"{name:24s} {statistics.median(r['ms']):7.3f} ms/step  ×{statistics.median(q):.2f} "
              f"(min ×{min(q):.2f}, max ×{max(q):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
