"""Step-time cost of the quantization substrate (and its targets).

One training step's forward + backward (zero_grad, forward, cross-entropy, backward; no optimizer
step) at batch 256, for:

* the float model vs the same model after ``quantize_model(bits=2)`` (LSQ, clipped STE):
  target fake-quant ≤ 1.3× float;
* learnable surrogates (``slste``, ``plste``, element granularity) vs the fixed ``ste``:
  target learnable ψ ≤ 1.1× fixed ψ.

Models: the MLP 784-512-512-10 and the CNN (``ResNet``; by default the ``fashion-resnet`` task's
1 block per stage, width 8 — ``--blocks 3 --width 16`` is ResNet-20). All variants of one model
are timed in the same run, interleaved (one step of each variant per repetition, in a rotating
order), and compared by their medians. Threads are fixed with ``torch.set_num_threads``. The
clock is the process's CPU time by default (``--clock cpu``: on a shared machine, time spent
descheduled does not count); ``--clock wall`` uses ``time.perf_counter``.

    python benchmarks/bench_substrate.py [--threads 1] [--reps 30] [--batch 256] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.bench import models

TARGETS = {"fake-quant / float": 1.3, "learnable / fixed": 1.1}


def _variants(make: Callable[[], nn.Module]) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    float_model = make()
    out = {"float": float_model}
    for surrogate in ("ste", "slste", "plste"):
        out[f"2-bit {surrogate}"] = metaste.quantize_model(float_model, bits=2, surrogate=surrogate)
    return out


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clock: Callable[[], float]) -> float:
    t0 = clock()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return clock() - t0


def time_variants(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    reps: int,
    warmup: int = 3,
    clock: Callable[[], float] = time.process_time,
) -> dict:
    """Median seconds per forward+backward step of each variant, interleaved over ``reps`` rounds."""
    variants = _variants(make)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        for k in range(len(names)):
            n = names[(r + k) % len(names)]  # rotate the order: no variant always runs first
            t = _step(variants[n], x, y, clock)
            if r >= warmup:
                times[n].append(t)
    return {n: statistics.median(ts) for n, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--blocks", type=int, default=1, help="CNN blocks per stage (3 = ResNet-20)")
    p.add_argument("--width", type=int, default=8, help="CNN base width (16 = ResNet-20)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    cases = {
        "MLP 784-512-512-10": (
            lambda: models.mlp((784, 512, 512, 10)),
            torch.randn(args.batch, 784, generator=g),
        ),
        f"ResNet ({args.blocks} block/stage, width {args.width})": (
            lambda: models.ResNet(blocks=args.blocks, width=args.width),
            torch.randn(args.batch, 1, 28, 28, generator=g),
        ),
    }
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.reps} reps (medians), {args.clock} clock"
    )
    print(
        "| model | float ms | 2-bit ste ms | slste ms | plste ms | fake-quant / float | slste / ste | plste / ste |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (make, x) in cases.items():
        t = time_variants(make, x, y, args.reps, clock=clock)
        ratios = [
            t["2-bit ste"] / t["float"],
            t["2-bit slste"] / t["2-bit ste"],
            t["2-bit plste"] / t["2-bit ste"],
        ]
        ms = [f"{t[k] * 1e3:.2f}" for k in ("float", "2-bit ste", "2-bit slste", "2-bit plste")]
        print(f"| {name} | " + " | ".join(ms) + " | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    print(
        f"targets: fake-quant / float <= {TARGETS['fake-quant / float']}, learnable / fixed <= {TARGETS['learnable / fixed']}"
    )


if __name__ == "__main__":
    main()
