"""Tables, verdicts and plots of a :class:`~metaste.bench.compare.Comparison`.

Every Δ is *method − best STE baseline*, paired by seed, with a Student-t 95 % CI over the seeds
both finished. The verdict is ``better`` / ``worse`` when the CI excludes 0 (in the direction that
is better for that quantity: lower train loss and perplexity, higher accuracy) and ``no
difference`` otherwise; it is given at equal steps and at equal compute (the baseline's run read
off at the forward-pass-equivalent step count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compare import Comparison
from .stats import fmt_ci, mean_ci

__all__ = ["Delta", "verdict", "deltas", "format_table", "plot_comparison", "verdict_lines", "write_outputs"]


@dataclass
class Delta:
    """A paired comparison: mean and CI half-width of the differences, seeds better out of n."""

    mean: float
    half: float
    better: int
    n: int
    verdict: str

    def cell(self, digits: int) -> str:
        if self.n == 0:
            return "—"
        return f"{fmt_ci(self.mean, self.half, digits)} ({self.better}/{self.n})"


def verdict(mean: float, half: float, n: int, lower_is_better: bool) -> str:
    """``better`` / ``worse`` if the 95 % CI of the mean difference excludes 0, else ``no
    difference``; ``too few seeds`` below 2 pairs."""
    if n < 2 or math.isnan(half):
        return "too few seeds"
    lo, hi = mean - half, mean + half
    if hi < 0:
        return "better" if lower_is_better else "worse"
    if lo > 0:
        return "worse" if lower_is_better else "better"
    return "no difference"


def paired(values: Sequence[float], reference: Sequence[float], lower_is_better: bool) -> Delta:
    """The paired Δ of two same-seed sequences, skipping pairs where either is not finite."""
    pairs = [(v, r) for v, r in zip(values, reference) if math.isfinite(v) and math.isfinite(r)]
    if not pairs:
        return Delta(math.nan, math.nan, 0, 0, "no finished pair")
    d = np.array([v - r for v, r in pairs])
    m, h = mean_ci(d)
    better = int(np.sum(d < 0)) if lower_is_better else int(np.sum(d > 0))
    return Delta(m, h, better, len(d), verdict(m, h, len(d), lower_is_better))


def _by_label(comp: Comparison) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in comp.runs:
        groups.setdefault(r["label"], []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["seed"])
    return groups


def metric_at(run: dict, step: int) -> float:
    """The test metric recorded at ``step`` (nan if the run stopped before it)."""
    for s, v in zip(run["eval_steps"], run["eval_values"]):
        if s == step:
            return float(v)
    return math.nan


def loss_at(run: dict, step: int) -> float:
    v = run["loss_at"].get(str(step), math.nan)
    return math.nan if v is None else float(v)


def deltas(comp: Comparison, label: str) -> dict[str, Delta]:
    """Δ train loss and Δ test metric of ``label`` against the baseline, at equal steps
    (``loss``, ``metric``) and at equal compute (``loss@compute``, ``metric@compute``)."""
    groups = _by_label(comp)
    steps = comp.setup["steps"]
    base = {r["seed"]: r for r in groups[comp.baseline]}
    rs = [r for r in groups[label] if r["seed"] in base]
    refs = [base[r["seed"]] for r in rs]
    lower = comp.metric != "accuracy"
    out = {
        "loss": paired([loss_at(r, steps) for r in rs], [loss_at(b, steps) for b in refs], True),
        "metric": paired([metric_at(r, steps) for r in rs], [metric_at(b, steps) for b in refs], lower),
    }
    if comp.compute_steps:
        k = comp.compute_steps[label]
        out["loss@compute"] = paired([loss_at(r, steps) for r in rs], [loss_at(b, k) for b in refs], True)
        out["metric@compute"] = paired(
            [metric_at(r, steps) for r in rs], [metric_at(b, k) for b in refs], lower
        )
    return out


def metric_name(comp: Comparison) -> str:
    return "test acc. (%)" if comp.metric == "accuracy" else "val. perplexity"


def format_table(comp: Comparison) -> str:
    """The comparison as markdown: a header naming the baseline and the notes, then one row per
    method (mean ± 95 % CI over seeds; Δ columns: paired vs the baseline, seeds better / n)."""
    groups = _by_label(comp)
    steps = comp.setup["steps"]
    s = comp.setup
    lines = [
        f"task `{s['task']}` ({s['scale']} scale), {s['bits']}-bit {s['quantizer']}, {s['optimizer']}, "
        f"from {s.get('init', 'scratch')}, "
        + (f"on {comp.hardware}, " if comp.hardware else "")
        + f"{steps} steps; evaluation seeds {_seeds(comp.protocol['seeds'])}, "
        f"tuning seeds {_seeds(comp.protocol['tune_seeds'])}",
    ]
    if comp.baseline is not None:
        b = comp.choices[comp.baseline]
        lines.append(
            f"baseline (**best STE**): `{comp.baseline}` at lr {b['lr']:g}"
            + (f", validation loss {b['val_loss']:.4f}" if math.isfinite(b["val_loss"]) else "")
        )
    lines += [f"- {n}" for n in comp.notes if not n.startswith("baseline:")]
    lines.append("")
    mname = metric_name(comp)
    head = ["method", "lr (settings tried)", "train loss", mname]
    if comp.baseline is not None:
        head += ["Δ loss", f"Δ {comp.metric}", "verdict (equal steps)"]
        if comp.compute_steps:
            head += [f"Δ {comp.metric} @ equal compute", "verdict (equal compute)"]
    head += ["diverged", "ms / step", "fwd-equiv / step"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mdig = 2
    for label, rs in groups.items():
        c = comp.choices[label]
        ok = [r for r in rs if math.isfinite(loss_at(r, steps))]
        opts = {k: v for k, v in c["options"].items() if k not in (comp.setup.get("method_opts") or {})}
        tuned = ", ".join(f"{k}={v}" for k, v in opts.items() if k in comp.protocol.get("tune", {}))
        row = [
            f"`{label}`" + (" (baseline)" if label == comp.baseline else ""),
            f"{c['lr']:g}" + (f", {tuned}" if tuned else "") + f" ({c['settings']})",
            fmt_ci(*mean_ci([loss_at(r, steps) for r in ok])) if ok else "—",
            fmt_ci(*mean_ci([metric_at(r, steps) for r in ok]), digits=mdig) if ok else "—",
        ]
        if comp.baseline is not None:
            if label == comp.baseline:
                row += ["—", "—", "—"] + (["—", "—"] if comp.compute_steps else [])
            else:
                d = deltas(comp, label)
                row += [
                    d["loss"].cell(3),
                    d["metric"].cell(mdig),
                    f"loss: {d['loss'].verdict}; {comp.metric}: **{d['metric'].verdict}**",
                ]
                if comp.compute_steps:
                    row += [
                        d["metric@compute"].cell(mdig) + f" (baseline at {comp.compute_steps[label]} steps)",
                        f"loss: {d['loss@compute'].verdict}; {comp.metric}: **{d['metric@compute'].verdict}**",
                    ]
        row += [
            f"{len(rs) - len(ok)}/{len(rs)}",
            fmt_ci(*mean_ci([r["sec_per_step"] * 1e3 for r in rs]), digits=2),
            f"{rs[0]['fwd_equiv']:g}",
        ]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + rows)


def _seeds(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _band(ax, x, curves: np.ndarray, lo: float, hi: float, **kw):
    """Mean ± 95 % CI clipped to the metric's range [lo, hi]; per-seed lines below 5 seeds."""
    mean = curves.mean(0)
    (line,) = ax.plot(x, mean, **kw)
    if len(curves) < 5:
        for c in curves:
            ax.plot(x, c, color=line.get_color(), lw=0.6, alpha=0.35)
    else:
        ci = np.array([mean_ci(col)[1] for col in curves.T])
        ax.fill_between(
            x, np.clip(mean - ci, lo, hi), np.clip(mean + ci, lo, hi), color=line.get_color(), alpha=0.2
        )
    return line


def plot_comparison(comp: Comparison, path: Path) -> Path:
    """Four panels: train loss vs steps, train loss vs forward-pass equivalents, the test metric
    vs steps, and the paired Δ test metric vs the baseline at each evaluation point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_label(comp)
    steps = comp.setup["steps"]
    acc = comp.metric == "accuracy"
    m_lo, m_hi = (0.0, 100.0) if acc else (1.0, math.inf)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    base = {r["seed"]: r for r in groups.get(comp.baseline, [])}
    for label, rs in groups.items():
        ok = [r for r in rs if not r["diverged"]]
        if not ok:
            continue
        n = min(len(r["curve"]) for r in ok)
        x = np.asarray(ok[0]["curve_steps"][:n])
        curves = np.stack([r["curve"][:n] for r in ok])
        keep = x <= steps
        line = _band(axes[0], x[keep], curves[:, keep], 0.0, math.inf, label=label)
        _band(axes[1], x * ok[0]["fwd_equiv"], curves, 0.0, math.inf, label=label, color=line.get_color())
        ev_steps = [s for s in ok[0]["eval_steps"] if s <= steps]
        ev = np.array([[metric_at(r, s) for s in ev_steps] for r in ok])
        _band(axes[2], ev_steps, ev, m_lo, m_hi, label=label, color=line.get_color(), marker="o", ms=3)
        if comp.baseline is not None and label != comp.baseline:
            pts = []
            for s in ev_steps:
                d = [metric_at(r, s) - metric_at(base[r["seed"]], s) for r in ok if r["seed"] in base]
                d = [v for v in d if math.isfinite(v)]
                pts.append(mean_ci(d) if len(d) > 1 else (math.nan, math.nan))
            m = np.array([p[0] for p in pts])
            h = np.array([p[1] for p in pts])
            axes[3].errorbar(
                ev_steps, m, yerr=h, label=label, color=line.get_color(), capsize=3, marker="o", ms=3
            )
    s = comp.setup
    n_seeds = len(comp.protocol["seeds"])
    band = "mean and per-seed lines" if n_seeds < 5 else "mean ± 95% CI over seeds"
    fig.suptitle(
        f"{s['task']}: {s['bits']}-bit {s['quantizer']}, {s['optimizer']}, {n_seeds} seeds ({band}); "
        f"baseline = best STE: {comp.baseline}",
        fontsize=10,
    )
    mlabel = "test accuracy (%)" if acc else "validation perplexity"
    axes[0].set(xlabel="step", ylabel="train loss (block mean)", title="train loss")
    axes[1].set(xlabel="forward-pass equivalents (STE step = 3)", ylabel="train loss", title="vs compute")
    axes[2].set(xlabel="step", ylabel=mlabel, title=mlabel)
    axes[3].axhline(0.0, color="k", lw=0.8)
    axes[3].set(xlabel="step", ylabel=f"Δ {comp.metric} (paired, ± 95% CI)", title="Δ vs best STE")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def verdict_lines(comp: Comparison) -> list[str]:
    """One sentence per method: its Δ test metric and Δ train loss against the baseline, at equal
    steps and at equal compute, with the verdicts."""
    if comp.baseline is None:
        return []
    b = comp.choices[comp.baseline]
    out = []
    for label in _by_label(comp):
        if label == comp.baseline or label == "fp32":
            continue
        d = deltas(comp, label)
        line = (
            f"`{label}` vs best STE `{comp.baseline}` (lr {b['lr']:g}): {comp.metric} "
            f"{d['metric'].cell(2)} → **{d['metric'].verdict}**, train loss {d['loss'].cell(3)} → "
            f"**{d['loss'].verdict}**"
        )
        if comp.compute_steps:
            line += (
                f"; at equal compute {comp.metric} **{d['metric@compute'].verdict}**, "
                f"loss **{d['loss@compute'].verdict}**"
            )
        out.append(line)
    return out


def write_outputs(comp: Comparison, out: Path, stem: str = "") -> None:
    """Print the table; write ``table.md``, ``comparison.json`` and ``curves.png`` under ``out``."""
    table = format_table(comp)
    print(table, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}table.md").write_text(table + "\n")
    js = comp.save(out / f"{stem}comparison.json")
    png = plot_comparison(comp, out / f"{stem}curves.png")
    print(f"wrote {out / f'{stem}table.md'}, {js} and {png} ({comp.seconds / 60:.1f} min)", flush=True)
