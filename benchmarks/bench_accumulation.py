"""Peak memory of gradient accumulation: the wrappers' micro-batch path against plain torch.

    python benchmarks/bench_accumulation.py [--width 2048] [--micro 16] [--batch 32] [--repeats 3]

A 2-bit MLP (in 512 → width → width → 10, LSQ, last layer float) takes one step over
``micro`` micro-batches of ``batch`` examples. Variants:

* ``torch``: the bare optimizer, ``loss_i.backward()`` per micro-batch (plain accumulation);
* ``ste-iter`` / ``fogzo-iter`` / ``delayed-iter``: ``opt.step(closure)`` where the closure
  yields the micro-batch losses (the wrappers run backward on each as it comes: FOGZO with
  ``ste_fraction=1`` is the plain STE step, then real FOGZO n = 1 and HyperSTE delayed);
* ``ste-sum``: the previous README recipe, one closure that returns the sum of the micro-batch
  losses (every graph and fake-quantized weight copy alive until the single backward).

Measurement (CPU): each run is a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc serves every allocation above 64 KiB by mmap and returns it on free, so the resident set
follows the live tensors); the peak is ``ru_maxrss`` after the step minus the resident set just
before it (model, data and optimizer already built). The median over ``repeats`` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

VARIANTS = ("torch", "ste-iter", "fogzo-iter", "delayed-iter", "ste-sum")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_one(variant: str, width: int, micro: int, batch: int) -> float:
    """One step of ``variant`` in this process; returns its peak above the start (MiB)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import metaste

    torch.manual_seed(0)
    surrogate = "plste" if variant == "delayed-iter" else "ste"
    net = nn.Sequential(
        nn.Linear(512, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    model = metaste.quantize_model(net, bits=2, surrogate=surrogate)
    xs = [torch.randn(batch, 512) for _ in range(micro)]
    ys = [torch.randint(0, 10, (batch,)) for _ in range(micro)]
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    if variant in ("ste-iter", "ste-sum"):
        opt = metaste.FOGZO(base, total_steps=1, ste_fraction=1.0)
    elif variant == "fogzo-iter":
        opt = metaste.FOGZO(base, total_steps=100)
    elif variant == "delayed-iter":
        opt = metaste.HyperSTE(base, method="delayed")
    else:
        opt = base

    def micro_losses():
        for x, y in zip(xs, ys):
            yield F.cross_entropy(model(x), y) / micro

    start = _rss_kib()
    if variant == "torch":
        base.zero_grad()
        for loss in micro_losses():
            loss.backward()
        base.step()
    elif variant == "ste-sum":
        opt.step(lambda: sum(micro_losses()))
    else:
        opt.step(micro_losses)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.width, args.micro, args.batch)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:  # interleaved
            cmd = [
                sys.executable,
                __file__,
                "--one",
                v,
                "--width",
                str(args.width),
                "--micro",
                str(args.micro),
            ]
            cmd += ["--batch", str(args.batch)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            peaks[v].append(json.loads(out.strip().splitlines()[-1]))
    ref = statistics.median(peaks["torch"])
    print(f"MLP 512-{args.width}-{args.width}-10, 2 bits, {args.micro} micro-batches of {args.batch}")
    print("| variant | peak above start (MiB), median | runs | / torch |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        med = statistics.median(peaks[v])
        runs = ", ".join(f"{p:.0f}" for p in peaks[v])
        print(f"| {v} | {med:.0f} | {runs} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
