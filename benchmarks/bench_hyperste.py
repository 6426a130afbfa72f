"""HyperSTE cost vs plain STE in the same run (targets: analytical ≤ 1.10× time,
delayed ≤ 1.30× time, peak memory ≤ 1.3×).

Time: CPU time and wall time per step, medians and min–max spread over interleaved
repetitions (:mod:`_measure`: each round times ``--steps`` steps of every configuration in a
rotating order); the ratios to STE are taken round by round. Peak memory: the peak resident
bytes of one step above the process's size before the build, each configuration in a fresh
process with malloc returning every freed tensor (:func:`_measure.peak_bytes`). Run with one thread::

    OMP_NUM_THREADS=1 python benchmarks/bench_hyperste.py [--reps 7 --steps 5 --batch 128 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import fmt, interleaved, peak_bytes, ratio, summary  # noqa: E402

import metaste  # noqa: E402  (the checkout's, or $METASTE_PATH: _measure)
from metaste import HyperSTE  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 10),
    )


CONFIGS = {
    # name: (base optimizer, HyperSTE method or None for plain STE)
    "ste-sgd": ("sgd", None),
    "analytical": ("sgd", "analytical"),
    "delayed-sgd": ("sgd", "delayed"),
    "ste-adam": ("adam", None),
    "delayed-adam": ("adam", "delayed"),
}
TARGETS = {"analytical": (1.10, 1.3), "delayed-sgd": (1.30, 1.3), "delayed-adam": (1.30, 1.3)}


def build(arch: str, name: str, batch: int):
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    opt_name, method = CONFIGS[name]
    # plain STE runs the clipped-STE baseline; HyperSTE runs SLSTE (a = 1 starts as that STE)
    model = metaste.quantize_model(
        {"mlp": mlp, "cnn": cnn}[arch](), bits=2, surrogate="ste" if method is None else "slste"
    )
    base = (
        torch.optim.SGD(model.parameters(), lr=0.05)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )

    def closure():
        return F.cross_entropy(model(x), y)

    if method is None:

        def step():
            base.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            base.step()
            return loss.detach()

        return step
    opt = HyperSTE(base, method=method, hyper_lr=0.01)
    return lambda: opt.step(closure)


def run(args) -> dict:
    torch.set_num_threads(1)
    results = {}
    for arch in args.models.split(","):
        steps = {n: build(arch, n, args.batch) for n in CONFIGS}
        times = interleaved(steps, args.reps, args.steps)
        peak = {
            n: peak_bytes("bench_hyperste", "build", arch=arch, name=n, batch=args.batch) for n in CONFIGS
        }
        rows = {}
        for n in CONFIGS:
            ref = "ste-adam" if CONFIGS[n][0] == "adam" else "ste-sgd"
            rows[n] = {
                "ref": ref,
                "cpu_ms": summary([t * 1e3 for t in times[n]["cpu"]]),
                "wall_ms": summary([t * 1e3 for t in times[n]["wall"]]),
                "cpu_ratio": ratio(times[n]["cpu"], times[ref]["cpu"]),
                "wall_ratio": ratio(times[n]["wall"], times[ref]["wall"]),
                "peak_mib": peak[n] / 2**20,
                "mem_ratio": peak[n] / peak[ref],
            }
        results[arch] = rows
    return results


def print_table(results: dict, batch: int) -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch}")
    print(
        "| model | config | CPU ms/step | × STE (CPU) | wall ms/step | × STE (wall) | peak MiB | mem × STE |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arch, rows in results.items():
        for n, r in rows.items():
            print(
                f"| {arch} | {n} | {fmt(r['cpu_ms'])} | {fmt(r['cpu_ratio'], digits=3)} | {fmt(r['wall_ms'])} "
                f"| {fmt(r['wall_ratio'], digits=3)} | {r['peak_mib']:.1f} | {r['mem_ratio']:.3f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = run(args)
    print_table(results, args.batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
