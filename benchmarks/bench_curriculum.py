"""Cost of a quantization curriculum (docs/design.md §12): one training step — zero_grad, forward,
backward, SGD step, ``cur.step()`` — with each curriculum against the plain STE step on the same
model, interleaved round by round (ratios with their min–max over the rounds), and the peak
memory of two steps in a fresh process. Targets: ≤ 1.05× time and ≤ 1.05× memory on the wide
MLP 784-512-512-10 (batch 256) and the tiny LLaMA of the kjv-llama task (batch 32 × 128 tokens),
2-bit LSQ, in the middle of the curriculum (ρ ≈ 0.5, where masks are drawn every step).

    OMP_NUM_THREADS=1 python benchmarks/bench_curriculum.py [--reps 15] [--steps 5]
"""

from __future__ import annotations

import argparse

import _measure
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.bench import data, models

ARMS = ("ste", "random", "nested", "blend", "noise")
TARGETS = {"time": 1.05, "memory": 1.05}


def _model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], callable]:
    torch.manual_seed(0)
    if name == "mlp":
        net = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        batch = (torch.randn(256, 784), torch.randint(0, 10, (256,)))
        return net, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])
    vocab = len(data.load_kjv().vocab)
    net = models.TinyLlama(vocab)
    tokens = torch.randint(0, vocab, (32, 129))
    return (
        net,
        (tokens[:, :-1], tokens[:, 1:]),
        lambda m, b: F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten()),
    )


def build(model: str, arm: str):
    """A zero-argument training step of ``arm`` on ``model`` (the `_measure` builder protocol)."""
    net, batch, loss_fn = _model(model)
    net = metaste.quantize_model(net, bits=2, quantizer="lsq")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    cur = None
    if arm != "ste":  # a long run, in the middle of its curriculum: ρ ≈ 0.5 at every timed step
        cur = metaste.QuantCurriculum(net, total_steps=10**6, curriculum=arm, length=1.0)
        cur.t = 500_000
        cur.step()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net, batch).backward()
        opt.step()
        if cur is not None:
            cur.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="mlp,llama")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    for model in args.models.split(","):
        times = _measure.interleaved({arm: build(model, arm) for arm in ARMS}, args.reps, args.steps)
        base = times["ste"]["cpu"]
        print(f"## {model}: one training step, CPU time, median (min–max) over {args.reps} rounds")
        print(
            f"{'arm':8s} {'ms/step':>22s} {'× ste':>20s}"
            + ("" if args.no_memory else f" {'peak MiB':>10s} {'× ste':>7s}")
        )
        peak_ste = (
            None
            if args.no_memory
            else _measure.peak_bytes("bench_curriculum", "build", model=model, arm="ste")
        )
        for arm in ARMS:
            line = f"{arm:8s} {_measure.fmt(_measure.summary(times[arm]['cpu']), 1e3):>22s} "
            line += f"{_measure.fmt(_measure.ratio(times[arm]['cpu'], base)):>20s}"
            if peak_ste is not None:
                peak = (
                    peak_ste
                    if arm == "ste"
                    else _measure.peak_bytes("bench_curriculum", "build", model=model, arm=arm)
                )
                line += f" {peak / 2**20:10.1f} {peak / peak_ste:7.3f}"
            print(line, flush=True)
    print(f"targets: time ≤ {TARGETS['time']}× ste, memory ≤ {TARGETS['memory']}× ste")


if __name__ == "__main__":
    main()
