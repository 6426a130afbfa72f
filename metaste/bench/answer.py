"""The one-screen answer that opens docs/results.md and the README: per set-up (task × bits ×
init × optimizer), the best tuned STE, the best metaste method, the best PARQ variant, and
whether either beats the STE — with the two numbers that say how far to trust it: the
baseline's seed-to-seed spread and the CI half-width of the Δ.

A method's row is its test-metric Δ against the best STE family at equal steps (paired over the
evaluation seeds, 95 % t-interval). "Best" among several methods is the one with the best mean
Δ; picking the best of k methods after the fact favours noise, so a `better` in this table is a
lead until it is confirmed on fresh seeds (the confirmation entries do that).
"""

from __future__ import annotations

import math

import numpy as np

from .compare import Comparison
from .methods import STE_BASELINES
from .peers import PARQ_METHODS
from .report import _by_label, deltas, metric_at

__all__ = ["answer_rows", "answer_table", "baseline_spread"]


def _name(label: str) -> str:
    return label.partition("[")[0]


def baseline_spread(comp: Comparison) -> float:
    """The baseline's seed-to-seed standard deviation of the test metric (equal steps)."""
    steps = comp.setup["steps"]
    vals = [metric_at(r, steps) for r in _by_label(comp)[comp.baseline]]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


def _best(comp: Comparison, labels: list[str]) -> tuple[str, object] | None:
    """The label with the best mean Δ test metric, and its Δ."""
    lower = comp.metric != "accuracy"
    scored = [(label, deltas(comp, label)["metric"]) for label in labels]
    scored = [(label, d) for label, d in scored if d.n > 0]
    if not scored:
        return None
    return min(scored, key=lambda x: x[1].mean if lower else -x[1].mean)


def answer_rows(entry_id: str, comp: Comparison) -> dict | None:
    """The answer's cells for one comparison (None without a baseline)."""
    if comp.baseline is None:
        return None
    labels = [lab for lab in _by_label(comp) if lab != comp.baseline and _name(lab) != "fp32"]
    ours = [lab for lab in labels if _name(lab) not in STE_BASELINES and _name(lab) not in PARQ_METHODS]
    parq = [lab for lab in labels if _name(lab) in PARQ_METHODS]
    steps = comp.setup["steps"]
    base_vals = [metric_at(r, steps) for r in _by_label(comp)[comp.baseline]]
    base_vals = [v for v in base_vals if math.isfinite(v)]
    return dict(
        id=entry_id,
        setup=comp.setup,
        metric=comp.metric,
        seeds=len(comp.protocol["seeds"]),
        baseline=comp.baseline,
        baseline_mean=float(np.mean(base_vals)) if base_vals else math.nan,
        spread=baseline_spread(comp),
        ours=_best(comp, ours),
        parq=_best(comp, parq),
    )


def _cell(best: tuple[str, object] | None, digits: int) -> str:
    if best is None:
        return "—"
    label, d = best
    return f"`{label}` {d.mean:+.{digits}f} ± {d.half:.{digits}f} → **{d.verdict}**"


def answer_table(rows: list[dict]) -> str:
    """Markdown: one line per comparison, then how to read it."""
    head = (
        "| set-up | seeds | best STE (tuned) | its spread (SD) | best metaste method: Δ ± CI → verdict "
        "| best PARQ: Δ ± CI → verdict |"
    )
    out = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["setup"]
        acc = r["metric"] == "accuracy"
        digits = 2 if acc else 3
        unit = "%" if acc else " ppl"
        where = (
            f"{s['task']} {s['bits']}-bit {s['quantizer']}, {s['optimizer']}, from {s.get('init', 'scratch')}"
            f" (`{r['id']}`)"
        )
        out.append(
            f"| {where} | {r['seeds']} | `{r['baseline']}` {r['baseline_mean']:.{digits}f}{unit} "
            f"| {r['spread']:.{digits}f} | {_cell(r['ours'], digits)} | {_cell(r['parq'], digits)} |"
        )
    return "\n".join(out)
