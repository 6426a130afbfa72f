"""How long a task must train before the STE's test metric stops moving: one long run per seed
of an STE variant, the test metric (BatchNorm re-estimated, as in every comparison) at evenly
spaced steps, saved as ``docs/results/plateau/<task>.json`` and ``.png``; `metaste report`
puts the plot and the numbers in docs/results.md beside the suites that use the task.

    OMP_NUM_THREADS=1 python benchmarks/plateau.py --task fashion-resnet --method ste-identity \\
        --lr 0.1 --steps 1500 --points 15 --seeds 2
    OMP_NUM_THREADS=1 python benchmarks/plateau.py --task kjv-llama --method ste-identity \\
        --bits 4 --lr 0.002 --steps 600 --points 8 --seeds 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metaste.bench import tasks
from metaste.bench.runner import RunSpec, run_all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=tuple(tasks.TASKS))
    p.add_argument("--method", default="ste-identity")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--points", type=int, default=10, help="evaluation points over the run")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/results/plateau"))
    args = p.parse_args()
    task = tasks.get_task(args.task)
    bits = args.bits or task.bits
    marks = tuple(int(round(args.steps * (k + 1) / args.points)) for k in range(args.points))
    specs = [
        RunSpec(
            args.task, args.method, args.method, seed, args.lr, args.steps, bits, task.quantizer, marks=marks
        )
        for seed in range(args.seeds)
    ]
    results = run_all(specs, args.workers)
    curves = np.array([[r.metric_at(s) for s in marks] for r in results])
    record = dict(
        task=args.task,
        method=args.method,
        bits=bits,
        lr=args.lr,
        optimizer=task.optimizer,
        steps=list(marks),
        per_seed=curves.tolist(),
        mean=curves.mean(0).tolist(),
        metric=task.metric,
        command=(
            f"OMP_NUM_THREADS=1 python benchmarks/plateau.py --task {args.task} --method {args.method} "
            f"--bits {bits} --lr {args.lr:g} --steps {args.steps} --points {args.points} --seeds {args.seeds}"
        ),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.task}.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(record, args.out / f"{args.task}.png")
    print(json.dumps({k: record[k] for k in ("task", "steps", "mean")}))


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, c in enumerate(record["per_seed"]):
        ax.plot(record["steps"], c, color="C0", alpha=0.35, lw=0.8, label="seeds" if i == 0 else None)
    ax.plot(record["steps"], record["mean"], color="C0", marker="o", ms=3, label="mean")
    ylabel = "test accuracy (%)" if record["metric"] == "accuracy" else "validation perplexity"
    ax.set(
        xlabel="step",
        ylabel=ylabel,
        title=f"{record['task']}: {record['method']}, {record['bits']}-bit, {record['optimizer']} lr {record['lr']:g}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
