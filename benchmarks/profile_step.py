"""Where a wrapper's step goes, op by op: torch.profiler over steps of PEGE, JacQuant, the calibrated
surrogate (bench_new_methods' models) or HyperSTE (bench_hyperste's), beside plain STE on the
same model; per step, each op's own CPU time in both and their difference as % of an STE step,
largest first (the compiled passes together; the profiler adds a few µs to every op, so read the
differences, and the step times in the header, measured without it). Run with one thread::

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --method pege [--model wide] [--steps 10] [--top 15]
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --method analytical

(FOGZO has its own phase timer: benchmarks/profile_fogzo_step.py.)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_hyperste  # noqa: E402
import bench_new_methods  # noqa: E402

import metaste  # noqa: E402

NEW = ("pege", "jacquant", "jacquant-storm", "calibrated")
HYPER = ("analytical", "delayed-sgd", "delayed-adam")


def step_fn(method: str, model: str):
    """A zero-argument step of ``method`` (or of its plain-STE reference)."""
    if method in HYPER or method.startswith("ste-"):
        return bench_hyperste.build("mlp", method, 128)
    sizes, batch = bench_new_methods.MODELS[model]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    net, opt = bench_new_methods.builders(10**6, sizes)[method]()
    if isinstance(opt, metaste.optim.OptimizerWrapper):
        return lambda: opt.step(lambda: F.cross_entropy(net(x), y))

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def cpu_ms(step, steps: int) -> float:
    for _ in range(steps):  # warm: every compiled variant the steps need is built
        step()
    t0 = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=NEW + HYPER, required=True)
    ap.add_argument(
        "--model", choices=tuple(bench_new_methods.MODELS), default="wide", help="PEGE, JacQuant, calibrated"
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = {"delayed-adam": "ste-adam"}.get(args.method, "ste-sgd" if args.method in HYPER else "ste")
    step, ste = step_fn(args.method, args.model), step_fn(ref, args.model)
    t_ste, t = cpu_ms(ste, args.steps), cpu_ms(step, args.steps)
    mine, theirs = own_times(step, args.steps), own_times(ste, args.steps)
    if args.method in HYPER:
        where = "MLP 784-512-256-10, batch 128"
    else:
        sizes, batch = bench_new_methods.MODELS[args.model]
        where = f"MLP {'-'.join(map(str, sizes))}, batch {batch}"
    print(
        f"# {args.method} on {where}: {t:.2f} ms/step, plain STE ({ref}) {t_ste:.2f} ms/step (×{t / t_ste:.2f}; CPU time)"
    )
    print(f"| op (own time) | {args.method} ms/step | STE ms/step | difference, % of an STE step |")
    print("|---|---|---|---|")
    diff = {k: mine.get(k, 0.0) - theirs.get(k, 0.0) for k in set(mine) | set(theirs)}
    for name, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
        print(
            f"| {name} | {mine.get(name, 0.0):.2f} | {theirs.get(name, 0.0):.2f} | {100 * d / t_ste:+.0f} % |"
        )


def own_times(step, steps: int) -> dict[str, float]:
    """Each op's own CPU time per step under torch.profiler (the compiled passes together; the
    wrapper's own scope left out: its self time is mostly the profiler's own per-op cost)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    own: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith("Optimizer.step#") and not ev.key.endswith(("SGD.step", "Adam.step")):
            continue
        name = "compiled passes" if ev.key.startswith("## Call CompiledFxGraph") else ev.key
        own[name] += ev.self_cpu_time_total / 1e3 / steps
    return dict(own)


if __name__ == "__main__":
    main()
