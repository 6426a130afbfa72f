"""HyperSTE on a Fashion-MNIST subset with a small ResNet (the thesis's experiment at CPU size).

1-bit DoReFa and 2-bit LSQ weights (first conv and last layer in full precision), STE vs
analytical SLSTE vs delayed SLSTE / PLSTE / DLSTE, with SGD (no momentum) and with Adam; every
configuration over ``--seeds`` seeds with the same data order per seed, so differences to STE
are paired. Prints test accuracy and final train loss as mean ± 95 % CI (Student t) and the
paired difference to STE with its CI; writes a PNG of the learned surrogates of one run per
configuration and a PNG of the train-loss curves.

    OMP_NUM_THREADS=1 python examples/hyperste_fashion.py --out runs/hyperste_fashion
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import HyperSTE
from metaste.bench import data
from metaste.bench.models import BasicBlock
from metaste.bench.plots import plot_surrogates
from metaste.bench.registry import train_step
from metaste.bench.stats import mean_ci


def load(n_train: int, n_test: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The first ``n_train``/``n_test`` images of the shared Fashion-MNIST loader, 2×2-average-pooled
    to 14×14 (the loader standardises with the training mean/std)."""
    d = data.load_fashion_mnist(n_train, n_test)
    return (F.avg_pool2d(d.x_train, 2), d.y_train), (F.avg_pool2d(d.x_test, 2), d.y_test)


def resnet() -> nn.Module:
    """A small ResNet for 14×14 inputs: stem 16, blocks 16 → 32 (stride 2), GAP, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BasicBlock(16, 16, 1),
        BasicBlock(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


QUANT = {
    "w1-dorefa": dict(bits=1, quantizer="dorefa"),
    "w2-lsq": dict(bits=2, quantizer="lsq"),
}
# name: (optimizer, HyperSTE method or None, surrogate, granularity)
CONFIGS = {
    "ste-sgd": ("sgd", None, "ste", "element"),
    "analytical-slste": ("sgd", "analytical", "slste", "element"),
    "delayed-sgd-slste": ("sgd", "delayed", "slste", "element"),
    "delayed-sgd-plste": ("sgd", "delayed", "plste", "element"),
    "delayed-sgd-dlste": ("sgd", "delayed", "dlste", "element"),
    "ste-adam": ("adam", None, "ste", "element"),
    "delayed-adam-slste": ("adam", "delayed", "slste", "element"),
    "delayed-adam-plste": ("adam", "delayed", "plste", "element"),
    "delayed-adam-dlste": ("adam", "delayed", "dlste", "element"),
}
GRANULARITY = {
    "delayed-sgd-slste-channel": ("sgd", "delayed", "slste", "channel"),
    "delayed-sgd-slste-tensor": ("sgd", "delayed", "slste", "tensor"),
    "delayed-sgd-dlste-channel": ("sgd", "delayed", "dlste", "channel"),
}


def run(quant: str, cfg: tuple, seed: int, splits, args) -> dict:
    opt_name, method, surrogate, granularity = cfg
    (xtr, ytr), (xte, yte) = splits
    torch.manual_seed(seed)
    model = metaste.quantize_model(
        resnet(), surrogate=surrogate, granularity=granularity, keep_fp="0", **QUANT[quant]
    )
    base = (
        torch.optim.SGD(model.parameters(), lr=args.lr_sgd, weight_decay=5e-4)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=args.lr_adam)
    )
    opt = HyperSTE(base, method=method, hyper_lr=args.hyper_lr, model=model) if method else base
    steps_per_epoch = len(xtr) // args.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)  # the data order depends on the seed only: paired
    curve = []
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * args.batch : (k + 1) * args.batch]
            x, y = xtr[idx], ytr[idx]
            loss = train_step(opt, lambda x=x, y=y: F.cross_entropy(model(x), y))
            curve.append(loss)
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean()) * 100
    out = {"acc": acc, "train_loss": statistics.mean(curve[-steps_per_epoch:]), "curve": curve}
    if method:
        d = opt.diagnostics
        out["health"] = {
            n: {k: v for k, v in layer.items() if k != "hist" and not isinstance(v, dict)}
            for n, layer in d["layers"].items()
        }
        out["model"] = model
    return out


def main() -> None:
    metaste.extras.require("plot")  # before any work: no failure after training
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/hyperste_fashion")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr-sgd", type=float, default=0.1)
    ap.add_argument("--lr-adam", type=float, default=2e-3)
    ap.add_argument("--hyper-lr", type=float, default=0.01)
    ap.add_argument("--granularity", action="store_true", help="also compare channel/tensor (2-bit)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load(args.train, args.test)
    jobs = [(q, n, CONFIGS[n]) for q in QUANT for n in CONFIGS]
    if args.granularity:
        jobs += [("w2-lsq", n, cfg) for n, cfg in GRANULARITY.items()]
    results: dict = {}
    t0 = time.time()
    for quant, name, cfg in jobs:
        for seed in range(args.seeds):
            r = run(quant, cfg, seed, splits, args)
            model = r.pop("model", None)
            if model is not None and seed == 0:
                plot_surrogates(model, out / f"surrogates_{quant}_{name}.png", f"{quant} {name} seed 0")
            results.setdefault(quant, {}).setdefault(name, []).append(r)
            print(
                f"[{time.time() - t0:6.0f}s] {quant} {name} seed {seed}: "
                f"acc {r['acc']:.2f} loss {r['train_loss']:.4f}"
            )
    report(results, out, args)


def report(results: dict, out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"Fashion-MNIST {args.train} train / {args.test} test (14×14), small ResNet, {args.epochs} epochs, "
        f"batch {args.batch}, {args.seeds} seeds, hyper_lr {args.hyper_lr} (normalized)",
        "",
        "| quant | method | test acc % (95% CI) | Δ acc vs STE (paired) | train loss | Δ loss vs STE |",
        "|---|---|---|---|---|---|",
    ]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for (quant, by_name), ax in zip(results.items(), axes[0]):
        for name, runs in by_name.items():
            ref = by_name["ste-adam" if "adam" in name else "ste-sgd"]
            acc, loss = [r["acc"] for r in runs], [r["train_loss"] for r in runs]
            da = [r["acc"] - s["acc"] for r, s in zip(runs, ref)]
            dl = [r["train_loss"] - s["train_loss"] for r, s in zip(runs, ref)]
            (ma, ca), (ml, cl), (mda, cda), (mdl, cdl) = mean_ci(acc), mean_ci(loss), mean_ci(da), mean_ci(dl)
            same = name.startswith("ste")
            lines.append(
                f"| {quant} | {name} | {ma:.2f} ± {ca:.2f} | "
                + ("—" if same else f"{mda:+.2f} ± {cda:.2f}")
                + f" | {ml:.4f} ± {cl:.4f} | "
                + ("—" if same else f"{mdl:+.4f} ± {cdl:.4f}")
                + " |"
            )
            curve = np.mean([r["curve"] for r in runs], axis=0)
            k = max(1, len(curve) // 50)
            ax.plot(np.convolve(curve, np.ones(k) / k, mode="valid"), label=name, lw=1)
        ax.set_title(quant)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds, smoothed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    health = {
        q: {n: [r.get("health") for r in runs] for n, runs in by.items() if runs[0].get("health")}
        for q, by in results.items()
    }
    (out / "health.json").write_text(json.dumps(health, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
