"""Cost of the HyperSTE horizon methods (and their targets).

1. **P-FAGU step time vs plain STE** (target ≤ 1.1·(K+1)×): the ``fashion-resnet`` model
   (ResNet-8-style, width 8) on random 28×28 batches of 128, SGD; P-FAGU with a horizon of T
   steps and K replays, time per *user* step (a horizon's T steps, replays and final pass
   divided by T) against plain STE steps. Median over interleaved repetitions, so machine noise
   hits both alike. The ratio is printed with the ideal (K+1) and the target 1.1·(K+1).

2. **lgatt exact peak memory for T = 2, 4, 8**: an MLP 784-1024-512-10 (quantized, 2-bit LSQ,
   SLSTE; ≈1.3 M parameters, so its weights dominate the activations of a batch of 32), one
   horizon with K = 1 (the user's pass, the reverse sweep, no final pass), SGD and Adam.
   How memory is measured on CPU: the process's peak resident set (``VmHWM`` in
   ``/proc/self/status``), reset right before the horizon by writing ``5`` to
   ``/proc/self/clear_refs`` (Linux ≥ 4.0), minus the resident set at that moment. It counts
   everything the horizon touches (tensors, allocator slack, the autograd graph), not only what
   torch reports. Each measurement runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_``
   fixed at 128 KiB, so large tensors are ``mmap``-allocated and returned to the OS when freed
   (glibc's adaptive threshold would otherwise serve them from a heap that never shrinks) and a
   measurement cannot hide in memory touched before it; a plain training step runs first, so
   one-time allocations are not counted. Beside it: the bytes
   of the trace the sweep stores (T × (parameters + optimizer state + buffers)), and, for SGD,
   the same T steps as a create_graph unroll (the naive alternative: the graph of every step is
   kept until the final backward). The peak should grow by about one trace entry per step of T.

    OMP_NUM_THREADS=1 python benchmarks/bench_horizon.py [--reps 5 --horizon 6 --replays 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import HyperSTE
from metaste.bench.models import ResNet

KIB = 1024


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * KIB


def _reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    return _status("VmRSS")


# -- 1. step time ------------------------------------------------------------------------------


def time_pfagu(reps: int, horizon: int, replays: int, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(horizon)
    ]

    def make(method: str | None):
        torch.manual_seed(0)
        model = metaste.quantize_model(
            ResNet(blocks=1, width=8), bits=2, surrogate="slste" if method else "ste"
        )
        base = torch.optim.SGD(model.parameters(), lr=0.05)
        if method is None:

            def run():
                for x, y in data:
                    base.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    base.step()

            return run
        opt = HyperSTE(base, method=method, model=model, horizon=horizon, replays=replays, hyper_lr=0.01)

        def run():
            for x, y in data:
                opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))

        return run

    runs = {"ste": make(None), "pfagu": make("pfagu")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(reps):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append((time.perf_counter() - t0) / horizon)
    ste, pf = statistics.median(times["ste"]), statistics.median(times["pfagu"])
    print(f"## P-FAGU step time (fashion-resnet model, batch {batch}, T = {horizon}, K = {replays}, SGD)\n")
    print("| method | ms / user step | ratio vs STE | ideal (K+1) | target 1.1·(K+1) |")
    print("|---|---|---|---|---|")
    print(f"| STE | {ste * 1e3:.1f} | 1.00 | | |")
    print(f"| P-FAGU | {pf * 1e3:.1f} | {pf / ste:.2f} | {replays + 1} | {1.1 * (replays + 1):.1f} |")
    print()


# -- 2. lgatt memory ---------------------------------------------------------------------------


def _mlp_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return metaste.quantize_model(net, bits=2, surrogate="slste")


def _batches(n: int, batch: int):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)
    ]


def lgatt_peak(opt_name: str, T: int, batch: int) -> tuple[int, int]:
    """(peak RSS above the start of the horizon, bytes of the stored trace) for one lgatt horizon."""
    model = _mlp_model()
    base = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if opt_name == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.05)
    )
    data = _batches(T + 1, batch)
    # one plain step first, so that Adam's moments exist before the snapshot and the measurement
    F.cross_entropy(model(data[-1][0]), data[-1][1]).backward()
    base.step()
    opt = HyperSTE(
        base, method="lgatt", model=model, horizon=T, replays=1, final_pass=False, last="extra_carry"
    )
    start = _reset_peak()
    opt.run_horizon([lambda x=x, y=y: F.cross_entropy(model(x), y) for x, y in data[:T]])
    peak = _status("VmHWM") - start
    return peak, opt.method.memory_estimate["trace"]


def unroll_peak(T: int, batch: int) -> int:
    """Peak RSS of the same T SGD steps as one create_graph unroll, backpropagated to θ."""
    model = _mlp_model()
    data = _batches(T, batch)
    names = [n for n, _ in model.named_parameters()]
    thetas = []
    for _, t in metaste.surrogate_parameters(model):
        thetas.append(t.detach().clone().requires_grad_())
    surrogates = [m for m in model.modules() if getattr(m, "learnable", False)]
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()  # one-time allocations before the measurement
    for p in model.parameters():
        p.grad = None
    start = _reset_peak()
    for s, th in zip(surrogates, thetas):
        s.a = th  # ψ(u; θ) with θ an autograd leaf: the unroll differentiates through it
    params = {n: p for n, p in model.named_parameters()}
    for x, y in data:
        loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - 0.05 * g for n, p, g in zip(names, params.values(), grads)}
    final = F.cross_entropy(torch.func.functional_call(model, params, (data[0][0],)), data[0][1])
    torch.autograd.grad(final, thetas)
    return _status("VmHWM") - start


def _measure(kind: str, T: int, batch: int) -> dict:
    """Run one measurement in a fresh interpreter (see the module docstring)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * KIB), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--mem-one", kind, str(T), "--mem-batch", str(batch)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory(batch: int) -> None:
    n_params = sum(p.numel() for p in _mlp_model().parameters())
    mib = 2.0**20
    print(
        f"## lgatt exact: peak memory of one horizon (MLP, {n_params / 1e6:.2f} M parameters, batch {batch})\n"
    )
    print(f"|x| = {n_params * 4 / mib:.1f} MiB of parameters (Adam adds 2|x| of state)\n")
    print("| T | SGD peak (MiB) | SGD trace | Adam peak (MiB) | Adam trace | SGD create_graph unroll peak |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for T in (2, 4, 8):
        sgd, adam, unroll = (_measure(k, T, batch) for k in ("sgd", "adam", "unroll"))
        rows[T] = (sgd["peak"], adam["peak"], unroll["peak"])
        print(
            f"| {T} | {sgd['peak'] / mib:.1f} | {sgd['trace'] / mib:.1f} | {adam['peak'] / mib:.1f} | "
            f"{adam['trace'] / mib:.1f} | {unroll['peak'] / mib:.1f} |"
        )
    print()
    for i, name in enumerate(("SGD", "Adam", "SGD create_graph unroll")):
        slope = (rows[8][i] - rows[2][i]) / 6
        print(f"* {name}: the peak grows by {slope / mib:.1f} MiB per step of T")
    print(
        f"* one trace entry: SGD {n_params * 4 / mib:.1f} MiB (|x|), Adam {3 * n_params * 4 / mib:.1f} MiB (3|x|)"
    )


def _one(kind: str, T: int, batch: int) -> None:
    if kind == "unroll":
        print(json.dumps({"peak": unroll_peak(T, batch), "trace": 0}))
    else:
        peak, trace = lgatt_peak(kind, T, batch)
        print(json.dumps({"peak": peak, "trace": trace}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--horizon", type=int, default=6)
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--mem-batch", type=int, default=32)
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--mem-one", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_one:
        _one(args.mem_one[0], int(args.mem_one[1]), args.mem_batch)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    if not args.skip_time:
        time_pfagu(args.reps, args.horizon, args.replays, args.batch)
    if not args.skip_memory:
        memory(args.mem_batch)


if __name__ == "__main__":
    main()
