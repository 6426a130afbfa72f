"""Per-step time of PEGE, JacQuant, the calibrated surrogate and torchao's PARQ relative to plain
STE, measured interleaved in one process, CPU time, one thread (docs/methods/*.md "Cost")::

    OMP_NUM_THREADS=1 python benchmarks/bench_new_methods.py [--model mlp|wide] [--steps N] [--rounds R]

``mlp``: the FOGZO paper's MLP 784-10-10, batch 64; ``wide``: MLP 784-512-512-10, batch 256; both
layers 2-bit LSQ. ``jacquant-storm-nophase``: STORM with flip_rate = 1 (no phase boundary, so the
second pass at the previous weights runs every step). ``sgd-float``: the float model with plain
SGD, the step PARQ's ``QuantOptimizer`` (``parq``, ``parq-hard``: its proximal map after each SGD
step, on the same float model) wraps; needs the ``[torchao]`` extra."""

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

    return {"ste": ste, "pege": pege, "jacquant": jacquant("none"), "jacquant-storm": jacquant("storm"),
            "jacquant-storm-nophase": jacquant("storm", flip_rate=1.0), "calibrated": calibrated,
            "sgd-float": sgd_float, "parq-hard": parq("parq-hard"), "parq": parq("parq")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=tuple(MODELS), default="mlp")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes, batch = MODELS[args.model]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def run(model, opt, steps: int) -> None:
        for _ in range(steps):
            if isinstance(opt, metaste.optim.OptimizerWrapper):
                opt.step(lambda m=model: F.cross_entropy(m(x), y))
            else:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

    for build in builders(args.steps, sizes).values():  # untimed: the compiled passes compile here
        run(*build(), 2)
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved: every method once per round
        for name, build in builders(args.steps, sizes).items():
            model, opt = build()
            t0 = time.process_time()
            run(model, opt, args.steps)
            times.setdefault(name, []).append((time.process_time() - t0) / args.steps)
    print(
        f"{args.model}: MLP {'-'.join(map(str, sizes))}, batch {batch}, {args.rounds} rounds x {args.steps} steps"
    )
    for name, ts in times.items():
        ratios = [t / s for t, s in zip(ts, times["ste"])]  # round by round
        print(f"{name:24s} {1e3 * statistics.median(ts):7.3f} ms/step  ×{statistics.median(ratios):.2f} "
              f"(min ×{min(ratios):.2f}, max ×{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
