"""FOGZO on a model fake-quantized by torchao: ``quantize_(model, QATConfig(base, step="prepare"))``
makes 4-bit per-group fake-quantized Linear layers; ``metaste.adapters.scales_from(model)`` hands
FOGZO their live step sizes (no hand-written lambdas, before torchao's first forward); after
training, torchao's ``step="convert"`` produces the real int4 weight-only model, which is
evaluated (docs/design.md §10.6). The same seeds train the same model with torchao's own STE for
comparison.

Needs ``pip install 'metaste[torchao]'`` and Debian ``dataset-fashion-mnist``. About 20 s on one
CPU thread (measured, one seed: STE 0.836, FOGZO 0.838 test accuracy, the same after convert):

    OMP_NUM_THREADS=1 python examples/torchao_fogzo.py --steps 600
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup
from torchao.quantization.qat import QATConfig

import metaste
from metaste.bench.data import load_fashion_mnist


def make_model(bits: int, group: int, seed: int) -> tuple[nn.Module, IntxWeightOnlyConfig]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    base = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group))
    quantize_(model, QATConfig(base, step="prepare"))
    return model, base


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(method: str, data, args) -> dict[str, float]:
    xtr, ytr, xte, yte = data
    model, base = make_model(args.bits, args.group, args.seed)
    adamw = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if method == "fogzo":  # the metaste line: torchao's weights and step sizes, found by the adapter
        opt = metaste.FOGZO(adamw, total_steps=args.steps, scales=metaste.adapters.scales_from(model))
    order = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(xtr), (args.batch,), generator=order)
        x, y = xtr[idx], ytr[idx]
        if method == "fogzo":
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        else:  # torchao's own STE
            adamw.zero_grad()
            F.cross_entropy(model(x), y).backward()
            adamw.step()
    seconds = time.perf_counter() - t0
    fake = accuracy(model, xte, yte)
    quantize_(model, QATConfig(base, step="convert"))  # real int4 weight-only model
    return {"fake-quant acc": fake, "converted acc": accuracy(model, xte, yte), "s": seconds}


def main() -> None:
    metaste.extras.require("torchao")  # before any work: no failure after training
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=16, help="divides 784, 256 and 128")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    d = load_fashion_mnist(n_train=10000, n_test=2000)
    data = (d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test)
    print(
        f"{args.bits}-bit per-group({args.group}) torchao QAT, MLP 784-256-128-10, {args.steps} AdamW steps"
    )
    for method in ("ste", "fogzo"):
        r = train(method, data, args)
        print(
            f"{method:6s} fake-quant test acc {r['fake-quant acc']:.4f}   after convert {r['converted acc']:.4f}"
            f"   ({r['s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
