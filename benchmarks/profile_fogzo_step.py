"""Where a FOGZO step's time goes: each phase timed inside the step, beside plain STE.

Wraps, for the duration of the run, the pieces of :class:`metaste.FOGZO`'s step with CPU timers
(the clean pass with backward, the perturbed closure calls, the compiled noise passes, the joint
norm, the base optimizer's step) and reports ms per step; "other" is the rest of the step
(guards, ε, copies, Python). Interleaved with a plain STE step and a no-grad forward of the same
model. Run with one thread::

    OMP_NUM_THREADS=1 python benchmarks/profile_fogzo_step.py [--model wide] [--config n1-inplace] [--steps 20]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fogzo  # noqa: E402

import metaste.optim.core.probe as probe  # noqa: E402
import metaste.optim.core.wrapper as wrapper  # noqa: E402
import metaste.optim.fogzo.estimator as estimator  # noqa: E402


def _timed(acc: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.process_time() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wide", choices=("mlp", "wide", "cnn", "llama"))
    ap.add_argument("--config", default="n1-inplace", choices=[c for c in bench_fogzo.CONFIGS if c != "ste"])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = bench_fogzo.models(64)[args.model]
    _, opt, step, _ = bench_fogzo.build(spec, args.config)
    _, _, ste, closure = bench_fogzo.build(spec, "ste")
    acc: dict[str, float] = collections.defaultdict(float)
    kernel = estimator.kernel
    patches = {
        (probe, "closure_value"): "perturbed closures",
        (estimator, "joint_norm"): "joint norm",
        (wrapper.OptimizerWrapper, "_evaluate"): "clean pass + backward",
        (opt.optimizer, "step"): "base optimizer step",
    }
    saved = {k: getattr(*k) for k in patches}
    for (obj, attr), key in patches.items():
        setattr(obj, attr, _timed(acc, key, getattr(obj, attr)))
    estimator.kernel = lambda fn, kind, fused: _timed(
        acc, f"compiled pass {fn.__name__}", kernel(fn, kind, fused)
    )
    try:
        for _ in range(5):  # warm-up: the compiled passes compile here
            step()
            ste()
        acc.clear()
        totals = {"fogzo": 0.0, "ste": 0.0, "fwd": 0.0}
        for _ in range(args.steps):
            for name, fn in (("fogzo", step), ("ste", ste)):
                t0 = time.process_time()
                fn()
                totals[name] += time.process_time() - t0
            t0 = time.process_time()
            with torch.no_grad():
                closure()
            totals["fwd"] += time.process_time() - t0
    finally:
        for (obj, attr), fn in saved.items():
            setattr(obj, attr, fn)
        estimator.kernel = kernel
    ms = {k: 1e3 * v / args.steps for k, v in totals.items()}
    print(
        f"# {args.model}, {args.config}: FOGZO {ms['fogzo']:.2f} ms/step, plain STE {ms['ste']:.2f}, no-grad forward {ms['fwd']:.2f} (CPU)"
    )
    print("| phase | ms/step | % of an STE step |\n|---|---|---|")
    phases = {key: 1e3 * v / args.steps for key, v in acc.items()}  # disjoint parts of the step
    phases["other (guards, ε, copies, Python)"] = ms["fogzo"] - sum(phases.values())
    for key, t in phases.items():
        print(f"| {key} | {t:.2f} | {100 * t / ms['ste']:.0f} % |")


if __name__ == "__main__":
    main()
