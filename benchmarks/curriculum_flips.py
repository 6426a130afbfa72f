"""What a quantization curriculum does to training: the quantized fraction ρ(t) beside the loss,
and the weight-flip rate (the fraction of quantized weights whose grid point changes in a step,
the mechanism the literature blames for QAT's noise) for the plain STE and each curriculum.
Saves ``docs/results/curriculum/flips.json`` and ``.png``; `metaste report` shows them.

    OMP_NUM_THREADS=1 python benchmarks/curriculum_flips.py --bits 1 --lr 0.4 --steps 1500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import metaste
from metaste.bench import tasks
from metaste.bench.registry import RunContext, base_optimizer
from metaste.curriculum import QuantCurriculum
from metaste.quant.registry import quantized_weights

ARMS = ("none", "random", "nested", "blend", "switch")


def codes(model: torch.nn.Module) -> list[torch.Tensor]:
    """The grid point of every quantized weight element (the sign for binary weights)."""
    out = []
    for _, entry in quantized_weights(model):
        u = entry.u()
        binary = entry.quantizer.kind == "dorefa"
        out.append(torch.sign(u) if binary else torch.round(u).clamp_(-entry.qn, entry.qp))
    return out


def quantized_fraction(cur: QuantCurriculum | None) -> float:
    """The fraction (or weight) of the quantized weights the training forward sees quantized:
    the mean mix, weighted by the weights' sizes (1 where the layer has none)."""
    if cur is None:
        return 1.0
    total = seen = 0.0
    for layer, entry in cur.layers:
        n = entry.weight.numel()
        m = layer.curriculum_mix
        seen += n if m is None else float(m.float().mean()) * n
        total += n
    return seen / total


def run(arm: str, args: argparse.Namespace, seed: int) -> dict[str, list[float]]:
    task = tasks.get_task(args.task)
    quantizer = "dorefa" if args.bits == 1 else task.quantizer
    model = metaste.quantize_model(
        task.model(seed), inplace=True, **{**task.quant_kwargs, "bits": args.bits, "quantizer": quantizer}
    )
    ctx = RunContext(task.optimizer, args.lr, args.steps, seed, task.weight_decay, task.momentum)
    opt = base_optimizer(model, ctx)
    cur = None
    if arm != "none":
        cur = QuantCurriculum(
            model,
            total_steps=args.steps,
            curriculum=arm,
            length=args.length,
            schedule=args.schedule,
            seed=seed,
        )
    losses, rhos, flips = [], [], []
    before = codes(model)
    for batch in task.batches(seed, args.steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        rhos.append(quantized_fraction(cur))
        if cur is not None:
            cur.step()
        after = codes(model)
        changed = sum(int((a != b).sum()) for a, b in zip(after, before))
        flips.append(changed / sum(a.numel() for a in after))
        losses.append(float(loss.detach()))
        before = after
    return {"loss": losses, "rho": rhos, "flip_rate": flips}


def smooth(x: list[float], k: int) -> np.ndarray:
    return np.convolve(np.asarray(x), np.ones(k) / k, mode="valid")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mnist-mlp", choices=tuple(tasks.TASKS))
    p.add_argument("--bits", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--length", type=float, default=0.5, help="T_c / T")
    p.add_argument("--schedule", default="log")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/results/curriculum"))
    args = p.parse_args()
    torch.set_num_threads(1)
    record: dict = {
        "task": args.task,
        "bits": args.bits,
        "lr": args.lr,
        "steps": args.steps,
        "length": args.length,
        "schedule": args.schedule,
        "command": (
            f"OMP_NUM_THREADS=1 python benchmarks/curriculum_flips.py --task {args.task} --bits {args.bits} "
            f"--lr {args.lr:g} --steps {args.steps} --length {args.length:g} --schedule {args.schedule} "
            f"--seeds {args.seeds}"
        ),
        "arms": {},
    }
    for arm in ARMS:
        per_seed = [run(arm, args, seed) for seed in range(args.seeds)]
        record["arms"][arm] = {k: np.mean([r[k] for r in per_seed], 0).tolist() for k in per_seed[0]}
        tail = record["arms"][arm]
        print(
            f"{arm:8s} mean flip rate {np.mean(tail['flip_rate']):.4f} "
            f"(last quarter {np.mean(tail['flip_rate'][-args.steps // 4 :]):.4f}), "
            f"final loss {np.mean(tail['loss'][-args.steps // 10 :]):.4f}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flips.json").write_text(json.dumps(record) + "\n")
    plot(record, args.out / "flips.png")
    print(f"wrote {args.out / 'flips.json'} and {args.out / 'flips.png'}")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rho, ax_loss, ax_flip) = plt.subplots(1, 3, figsize=(15, 4))
    k = max(1, record["steps"] // 50)
    for arm, series in record["arms"].items():
        label = "plain STE" if arm == "none" else arm
        ax_rho.plot(series["rho"], label=label)
        ax_loss.plot(smooth(series["loss"], k), label=label)
        ax_flip.plot(smooth(series["flip_rate"], k), label=label)
    ax_rho.set(title="quantized fraction / α  ρ(t)", xlabel="step")
    ax_loss.set(title=f"training loss (moving mean of {k})", xlabel="step", yscale="log")
    ax_flip.set(title="weight-flip rate per step", xlabel="step", yscale="log")
    ax_rho.legend()
    fig.suptitle(
        f"{record['task']}, {record['bits']}-bit, SGD lr {record['lr']:g}, T_c = {record['length']:g}·T, "
        f"{record['schedule']} schedule"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
