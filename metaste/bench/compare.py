"""``metaste compare``: train a task with several methods over paired seeds, print a table of
mean ± 95% CI, write the raw results (JSON) and the loss curves (PNG)."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..quant.convert import quantize_model
from ..quant.registry import surrogate_parameters
from .methods import METHODS, RunContext, train_step
from .stats import fmt_ci, mean_ci, paired_diff_ci
from .tasks import Task

__all__ = ["RunResult", "run_one", "compare", "format_table", "plot_curves", "save_results"]


@dataclass
class RunResult:
    method: str
    seed: int
    bits: int | None
    losses: list[float]
    eval_steps: list[int]
    eval_values: list[float]
    final_metric: float
    sec_per_step: float
    fwd_equiv: float
    extra: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10% of steps (smooths minibatch noise)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail))


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False, mininterval=0.5)
        except ImportError:
            pass
    return None


def run_one(
    task: Task,
    method_name: str,
    seed: int,
    *,
    steps: int,
    bits: int,
    quantizer: str,
    quant_overrides: dict | None = None,
    extra: dict | None = None,
    progress: bool = True,
    surrogate_plot: Path | None = None,
) -> RunResult:
    """Train ``task`` with one method and one seed; evaluate at ``task.eval_points`` points."""
    method = METHODS[method_name]
    model = task.model(seed)
    if method.quant is not None:
        qkw = {**task.quant_kwargs, "bits": bits, "quantizer": "dorefa" if bits == 1 else quantizer}
        qkw.update(quant_overrides or {})
        qkw.update(method.quant)
        model = quantize_model(model, inplace=True, **qkw)
    ctx = RunContext(
        task.optimizer, task.lr, steps, seed, task.weight_decay, task.momentum, dict(extra or {})
    )
    opt = method.build(model, ctx)
    model.train()
    marks = {int(round(steps * (k + 1) / task.eval_points)) for k in range(task.eval_points)}
    losses, eval_steps, eval_values = [], [], []
    bar = _progress(steps, f"{method_name} seed {seed}", progress)
    elapsed = 0.0
    for step, batch in enumerate(task.batches(seed, steps), start=1):
        t0 = time.perf_counter()
        loss = train_step(opt, lambda b=batch: task.loss(model, b))
        elapsed += time.perf_counter() - t0
        losses.append(loss)
        if not math.isfinite(loss):
            break
        if step in marks:
            eval_steps.append(step)
            eval_values.append(task.evaluate(model))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    final = eval_values[-1] if eval_values and len(losses) == steps else math.nan
    if surrogate_plot is not None and any(True for _ in surrogate_parameters(model)):
        from .plots import plot_surrogates

        plot_surrogates(model, surrogate_plot, title=f"{task.name}: {method_name}, seed {seed}")
    return RunResult(
        method_name,
        seed,
        None if method.quant is None else bits,
        losses,
        eval_steps,
        eval_values,
        final,
        elapsed / max(1, len(losses)),
        method.fwd_equiv(ctx),
    )


def compare(
    task: Task,
    methods: list[str],
    seeds: list[int],
    *,
    steps: int,
    bits: int,
    quantizer: str,
    quant_overrides: dict | None = None,
    extra: dict | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """Run every method on every seed (seed-major, so partial results are paired)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; valid choices are {tuple(METHODS)}")
    results = []
    for seed in seeds:
        for m in methods:
            plot = out / f"surrogates_{m}.png" if out is not None and seed == seeds[0] else None
            results.append(
                run_one(
                    task,
                    m,
                    seed,
                    steps=steps,
                    bits=bits,
                    quantizer=quantizer,
                    quant_overrides=quant_overrides,
                    extra=extra,
                    progress=progress,
                    surrogate_plot=plot,
                )
            )
    return results


def _by_method(results: list[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.method, []).append(r)
    return groups


def format_table(task: Task, results: list[RunResult], reference: str | None = "ste") -> str:
    """A markdown table: mean ± 95% CI over seeds, plus the paired difference to ``reference``."""
    groups = _by_method(results)
    metric = "test acc. (%)" if task.metric == "accuracy" else "val. perplexity"
    ref = groups.get(reference) if reference else None
    head = ["method", "bits", "seeds", "train loss", metric]
    if ref:
        head.append(f"Δ {task.metric} vs {reference} (paired)")
    head += ["ms / step", "fwd-equiv / step"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in groups.items():
        metric_vals = [r.final_metric for r in rs]
        row = [
            name,
            "fp32" if rs[0].bits is None else str(rs[0].bits),
            str(len(rs)),
            fmt_ci(*mean_ci([r.final_loss for r in rs])),
            fmt_ci(*mean_ci(metric_vals), digits=2),
        ]
        if ref:
            ref_by_seed = {r.seed: r.final_metric for r in ref}
            pairs = [(r.final_metric, ref_by_seed[r.seed]) for r in rs if r.seed in ref_by_seed]
            row.append(
                "—"
                if name == reference or len(pairs) < 2
                else fmt_ci(*paired_diff_ci(*zip(*pairs)), digits=2)
            )
        row += [fmt_ci(*mean_ci([r.sec_per_step * 1e3 for r in rs]), digits=2), f"{rs[0].fwd_equiv:g}"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(x) < k:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    return np.concatenate([c[1:k] / np.arange(1, k), (c[k:] - c[:-k]) / k])


def plot_curves(task: Task, results: list[RunResult], path: Path) -> Path:
    """Three panels: train loss vs steps, train loss vs forward-pass equivalents, the test metric vs
    steps; mean over seeds with a 95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, rs in _by_method(results).items():
        n = min(len(r.losses) for r in rs)
        k = max(1, n // 50)
        curves = np.stack([_smooth(np.asarray(r.losses[:n]), k) for r in rs])
        ci = np.array([mean_ci(col)[1] for col in curves.T]) if len(rs) > 1 else np.zeros(n)
        mean = curves.mean(0)
        steps = np.arange(1, n + 1)
        for ax, x in ((axes[0], steps), (axes[1], steps * rs[0].fwd_equiv)):
            (line,) = ax.plot(x, mean, label=name)
            ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
        ev = np.stack([r.eval_values for r in rs if len(r.eval_values) == len(rs[0].eval_values)])
        ev_ci = np.array([mean_ci(col)[1] for col in ev.T]) if len(ev) > 1 else 0
        axes[2].errorbar(rs[0].eval_steps, ev.mean(0), yerr=ev_ci, label=name, capsize=3)
    axes[0].set(xlabel="step", ylabel="train loss (smoothed)", title=f"{task.name}: train loss")
    axes[1].set(xlabel="forward-pass equivalents (STE step = 3)", ylabel="train loss", title="vs compute")
    ylabel = "test accuracy (%)" if task.metric == "accuracy" else "validation perplexity"
    axes[2].set(xlabel="step", ylabel=ylabel, title=ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_results(results: list[RunResult], path: Path) -> Path:
    """The raw per-seed results: ``path`` (JSON, with the loss curves) and ``path`` with suffix
    ``.csv`` (one row per method and seed: the table's inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) | {"final_loss": r.final_loss} for r in results], indent=1))
    with path.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["method", "seed", "bits", "steps", "final_loss", "final_metric", "sec_per_step", "fwd_equiv"]
        )
        for r in results:
            w.writerow(
                [r.method, r.seed, r.bits or "fp32", len(r.losses), r.final_loss, r.final_metric]
                + [r.sec_per_step, r.fwd_equiv]
            )
    return path
