"""HyperSTE cost vs plain STE in the same run (issue 5 targets: analytical ≤ 1.10×, delayed ≤ 1.30×).

Step time: median over interleaved repetitions (each rep times ``--steps`` steps of every
configuration in turn, so machine noise hits all of them alike). Peak memory: the peak of live
CPU tensor bytes during one step (torch.profiler memory events), after a warm-up step so that the
optimizer state and the HyperSTE history exist.

    OMP_NUM_THREADS=1 python benchmarks/bench_hyperste.py [--reps 7 --steps 10 --batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import metaste
from metaste import HyperSTE


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


def build(arch: str, name: str, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
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

    else:
        opt = HyperSTE(base, method=method, hyper_lr=0.01)

        def step():
            return opt.step(closure)

    return step


def peak_bytes(step) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'model':5} {'config':14} {'ms/step':>8} {'time ×':>7} {'peak MB':>8} {'mem ×':>6}")
    for arch in ("mlp", "cnn"):
        steps = {n: build(arch, n, x, y) for n in CONFIGS}
        for s in steps.values():  # warm-up: optimizer state, history, allocator
            s(), s()
        times = {n: [] for n in CONFIGS}
        for _ in range(args.reps):
            for n, s in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    s()
                times[n].append((time.perf_counter() - t0) / args.steps)
        med = {n: statistics.median(v) for n, v in times.items()}
        peak = {n: peak_bytes(s) for n, s in steps.items()}
        for n in CONFIGS:
            ref = "ste-adam" if CONFIGS[n][0] == "adam" else "ste-sgd"
            print(
                f"{arch:5} {n:14} {med[n] * 1e3:8.2f} {med[n] / med[ref]:7.3f} "
                f"{peak[n] / 2**20:8.1f} {peak[n] / peak[ref]:6.3f}"
            )


if __name__ == "__main__":
    main()
