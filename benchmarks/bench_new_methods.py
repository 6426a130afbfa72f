"""Per-step time of PEGE, JacQuant and the calibrated surrogate relative to plain STE, measured
interleaved in one process (docs/methods/*.md "Cost"): python benchmarks/bench_new_methods.py [--steps N]."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import metaste


def make(surrogate="ste", **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate=surrogate, keep_last=False, **kw)


def builders(steps):
    def ste():
        m = make()
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    def pege():
        m = make()
        return m, metaste.PEGE(torch.optim.SGD(m.parameters(), lr=0.1), total_steps=steps, model=m)

    def jacquant(vr):
        def b():
            m = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return m, metaste.JacQuant(torch.optim.SGD(m.parameters(), lr=0.1), vr=vr)

        return b

    def calibrated():
        m = make("leaky", granularity="tensor")
        return m, metaste.Calibrated(torch.optim.SGD(m.parameters(), lr=0.1), every=10, n=1)

    return {"ste": ste, "pege": pege, "jacquant": jacquant("none"), "jacquant-storm": jacquant("storm"),
            "calibrated": calibrated}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved: every method once per round
        for name, build in builders(args.steps).items():
            model, opt = build()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                if isinstance(opt, metaste.optim.OptimizerWrapper):
                    opt.step(lambda m=model: F.cross_entropy(m(x), y))
                else:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            times.setdefault(name, []).append((time.perf_counter() - t0) / args.steps)
    ste = statistics.median(times["ste"])
    for name, ts in times.items():
        ratios = [t / ste for t in ts]
        print(f"{name:16s} {1e3 * statistics.median(ts):7.3f} ms/step  ×{statistics.median(ratios):.2f} "
              f"(min ×{min(ratios):.2f}, max ×{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
