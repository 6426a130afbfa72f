"""FAGU and P-FAGU on a Fashion-MNIST subset (the thesis's Tables 5.2 / 5.4 at CPU scale).

The ``fashion-resnet`` model (ResNet-8-style: one basic block per stage, width 8; first conv
quantized, last layer in full precision), 2-bit LSQ weights, SGD (lr 0.05, no momentum: the task's
defaults), on a subset of Fashion-MNIST average-pooled to 14×14 so that a few hundred epochs fit a
CPU budget. Every configuration runs on ``--seeds`` seeds with the same initialisation and batch
order per seed (paired differences).

* **FAGU** (Table 5.2): one horizon of T = 1 epoch, K replays (thesis: 50), per-step schedule;
  the reported model is the final pass with θ^K. SLSTE vs STE, PLSTE / DLSTE vs PWL-STE, after
  the same single weight epoch.
* **P-FAGU** (Table 5.4): E epochs, each a horizon with K = 5 replays and a final pass, shared
  schedule warm-started from the previous epoch. Against STE / PWL-STE trained for the same E
  epochs, and against the stricter baseline: STE / PWL-STE trained for (K+1)·E epochs, the number
  of weight-epoch passes P-FAGU spends (equal compute).

DLSTE uses granularity ``channel`` (docs/design.md §2: per element DLSTE differs from PLSTE only when a
weight changes sign); SLSTE and PLSTE use ``element`` (the thesis's ATT). The driver is the
unchanged ``opt.step(closure)`` loop; each closure captures its batch.

    OMP_NUM_THREADS=1 python examples/hyperste_horizon_fashion.py --out runs/horizon_fashion

prints the tables (mean ± 95 % CI over seeds, Student t; paired Δ vs the baseline) and writes
``results.json``, ``fagu.png`` and ``pfagu.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import metaste
from metaste import HyperSTE
from metaste.bench.data import load_fashion_mnist
from metaste.bench.models import ResNet
from metaste.bench.registry import train_step
from metaste.bench.stats import fmt_ci, mean_ci, paired_diff_ci

BASELINE = {"slste": "ste", "plste": "pwl", "dlste": "pwl"}
GRANULARITY = {"slste": "element", "plste": "element", "dlste": "channel"}


def load(n_train: int, n_test: int):
    split = load_fashion_mnist(n_train=n_train, n_test=n_test)
    pool = lambda x: F.avg_pool2d(x, 2)  # noqa: E731 - 28×28 → 14×14
    return pool(split.x_train), split.y_train, pool(split.x_test), split.y_test


def epoch_batches(x, y, seed: int, epoch: int, batch: int):
    g = torch.Generator().manual_seed(1000 * seed + epoch)
    perm = torch.randperm(len(y), generator=g)
    return [(x[perm[i : i + batch]], y[perm[i : i + batch]]) for i in range(0, len(y) - batch + 1, batch)]


@torch.no_grad()
def accuracy(model, x, y, calib) -> float:
    """Test accuracy after recomputing the BN statistics on ``calib`` (training batches), as the
    thesis does for low-bit runs (5.1): the running averages lag behind fast-moving quantized
    weights and made single evaluations jump by tens of points. Training runs in train mode and
    never reads these statistics, so the trajectory is unchanged."""
    metaste.recalibrate_bn(model, calib)
    model.eval()
    acc = float((model(x).argmax(1) == y).double().mean()) * 100
    model.train()
    return acc


def run(data, surrogate: str, seed: int, epochs: int, args, method: str | None = None) -> dict:
    """Train one configuration; returns test accuracy and train loss after every weight epoch."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = metaste.quantize_model(
        ResNet(blocks=1, width=8),
        bits=2,
        surrogate=surrogate,
        granularity=GRANULARITY.get(surrogate, "element"),
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    steps = len(ytr) // args.batch
    if method == "fagu":
        opt = HyperSTE(
            opt, method="fagu", model=model, horizon=steps, replays=args.fagu_k, hyper_lr=args.hyper_lr
        )
    elif method == "pfagu":
        opt = HyperSTE(opt, method="pfagu", model=model, horizon=steps, replays=5, hyper_lr=args.hyper_lr)
    accs, losses = [], []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        # the training data order of an epoch: shared by every configuration of this seed (the
        # equal-compute baselines repeat the orders of the first epochs cyclically)
        batch_list = epoch_batches(xtr, ytr, seed, epoch % args.epochs, args.batch)
        user = [train_step(opt, lambda x=x, y=y: F.cross_entropy(model(x), y)) for x, y in batch_list]
        # the weights kept after a horizon are the final pass's: report its losses
        kept = opt.method.final_losses if method else user
        losses.append(sum(kept) / len(kept))
        accs.append(accuracy(model, xte, yte, batch_list[: args.calib]))
    out = {"acc": accs, "loss": losses, "seconds": time.perf_counter() - t0}
    if method:
        a = torch.cat([t.flatten() for _, t in metaste.surrogate_parameters(model)])
        out["a_mean"], out["a_q05"], out["a_q95"] = (
            float(a.mean()),
            float(a.quantile(0.05)),
            float(a.quantile(0.95)),
        )
    return out


def table(rows: dict[str, list[dict]], ref_of: dict[str, str]) -> str:
    """Markdown: final test acc. and train loss (mean ± 95 % CI), paired Δ of both vs a reference."""
    lines = [
        "| configuration | test acc. (%) | train loss | Δ acc. (paired) | Δ train loss (paired) | reference |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        acc, loss = [r["acc"][-1] for r in rs], [r["loss"][-1] for r in rs]
        ref = ref_of.get(name)
        d_acc = d_loss = "—"
        if ref in rows:
            d_acc = fmt_ci(*paired_diff_ci(acc, [r["acc"][-1] for r in rows[ref]]), digits=2)
            d_loss = fmt_ci(*paired_diff_ci(loss, [r["loss"][-1] for r in rows[ref]]))
        lines.append(
            f"| {name} | {fmt_ci(*mean_ci(acc), digits=2)} | {fmt_ci(*mean_ci(loss))} | {d_acc} | {d_loss} | {ref or ''} |"
        )
    return "\n".join(lines)


def plot(results: dict, out: Path, K: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results["fagu"])
    for i, name in enumerate(names):
        accs = [r["acc"][-1] for r in results["fagu"][name]]
        m, h = mean_ci(accs)
        ax.bar(i, m, yerr=h, capsize=4, color="C0" if name.startswith("FAGU") else "C7")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    lo = min(r["acc"][-1] for rs in results["fagu"].values() for r in rs)
    ax.set_ylim(lo - 3, None)
    ax.set(ylabel="test accuracy (%) after 1 weight epoch", title=f"FAGU (T = 1 epoch, K = {K}) vs fixed ψ")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "fagu.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, rs in results["pfagu"].items():
        n = len(rs[0]["acc"])
        mean = [sum(r["acc"][e] for r in rs) / len(rs) for e in range(n)]
        epochs = list(range(1, n + 1))
        passes = [e * 6 for e in epochs] if name.startswith("P-FAGU") else epochs
        style = "-" if name.startswith("P-FAGU") else ("--" if "equal" in name else ":")
        axes[0].plot(epochs, mean, style, marker="o", ms=3, label=name)
        axes[1].plot(passes, mean, style, marker="o", ms=3, label=name)
    axes[0].set(
        xlabel="weight epochs", ylabel="test accuracy (%)", title="P-FAGU vs fixed ψ, per weight epoch"
    )
    axes[1].set(
        xlabel="training passes over an epoch (compute)", ylabel="test accuracy (%)", title="… per compute"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pfagu.png", dpi=110)
    plt.close(fig)


def main() -> None:
    metaste.extras.require("plot")  # before any work: no failure after training
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=5120)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=4, help="P-FAGU weight epochs E")
    ap.add_argument("--fagu-k", type=int, default=10, help="FAGU replays (thesis: 50)")
    ap.add_argument("--hyper-lr", type=float, default=0.1, help="normalised: relative move of a per replay")
    ap.add_argument("--calib", type=int, default=20, help="training batches for BN recalibration before eval")
    ap.add_argument("--out", type=Path, default=Path("runs/horizon_fashion"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = load(args.n_train, args.n_test)
    t0 = time.perf_counter()
    fagu: dict[str, list[dict]] = {}
    pfagu: dict[str, list[dict]] = {}
    E = args.epochs
    for seed in range(args.seeds):
        for base in ("ste", "pwl"):
            fagu.setdefault(f"{base.upper()} (1 epoch)", []).append(run(data, base, seed, 1, args))
            pfagu.setdefault(f"{base.upper()} ({E} epochs)", []).append(run(data, base, seed, E, args))
            pfagu.setdefault(f"{base.upper()} ({6 * E} epochs, equal compute)", []).append(
                run(data, base, seed, 6 * E, args)
            )
        for s in ("slste", "plste", "dlste"):
            fagu.setdefault(f"FAGU {s.upper()}", []).append(run(data, s, seed, 1, args, "fagu"))
            pfagu.setdefault(f"P-FAGU {s.upper()}", []).append(run(data, s, seed, E, args, "pfagu"))
        print(f"seed {seed} done after {time.perf_counter() - t0:.0f} s", flush=True)
    refs_f = {f"FAGU {s.upper()}": f"{BASELINE[s].upper()} (1 epoch)" for s in BASELINE}
    refs_p = {f"P-FAGU {s.upper()}": f"{BASELINE[s].upper()} ({E} epochs)" for s in BASELINE}
    refs_eq = {
        f"P-FAGU {s.upper()}": f"{BASELINE[s].upper()} ({6 * E} epochs, equal compute)" for s in BASELINE
    }
    print(f"\n## FAGU: one horizon of 1 epoch, K = {args.fagu_k}, 2-bit LSQ ({args.seeds} seeds)\n")
    print(table(fagu, refs_f))
    print(f"\n## P-FAGU: {E} epochs, K = 5 per epoch, 2-bit LSQ ({args.seeds} seeds)\n")
    print(table(pfagu, refs_p))
    print("\n### P-FAGU against the equal-compute baselines\n")
    print(table({k: v for k, v in pfagu.items() if k in refs_eq or "equal" in k}, refs_eq))
    print("\n### learned a (mean, 5 % and 95 % quantiles; seed 0)\n")
    for name, rs in {**fagu, **pfagu}.items():
        if "a_mean" in rs[0]:
            print(f"* {name}: mean {rs[0]['a_mean']:.3f}, q05 {rs[0]['a_q05']:.3f}, q95 {rs[0]['a_q95']:.3f}")
    secs = {name: sum(r["seconds"] for r in rs) / len(rs) for name, rs in {**fagu, **pfagu}.items()}
    print("\n### seconds per run (mean over seeds)\n")
    print(", ".join(f"{k}: {v:.1f}" for k, v in secs.items()))
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "fagu": fagu, "pfagu": pfagu}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out, args.fagu_k)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; wrote {args.out}/results.json, fagu.png, pfagu.png")


if __name__ == "__main__":
    main()
