"""The one-screen answer that opens docs/results.md and the README: per set-up (task × bits ×
quantizer × optimizer × init), the best tuned STE, the best metaste method, the best PARQ
variant, and whether either beats the STE — with the two numbers that say how far to trust it:
the baseline's seed-to-seed spread and the CI half-width of the Δ.

A method's row is its test-metric Δ against the best STE family at equal steps (paired over the
evaluation seeds, 95 % t-interval). "Best" among several methods is the one with the best mean
Δ; picking the best of k methods after the fact favours noise, so a `better` in this table is a
lead until it is confirmed on fresh seeds (the confirmation entries do that).
"""

from __future__ import annotations

import math

import numpy as np

from .compare import Comparison
from .peers import PARQ_METHODS
from .registry import STE_BASELINES
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
    family = [lab for lab in comp.choices if _name(lab) in STE_BASELINES and "[" not in lab]
    return dict(
        baseline_family_float=any(_name(lab).endswith("-float") for lab in family),
        deltas={
            "ours": {lab: deltas(comp, lab)["metric"].verdict for lab in ours},
            "parq": {lab: deltas(comp, lab)["metric"].verdict for lab in parq},
        },
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


def _key(row: dict) -> tuple:
    s = row["setup"]
    return (
        s["task"],
        s["bits"],
        s["quantizer"],
        s["optimizer"],
        s.get("init", "scratch"),
        s.get("scale", "cpu"),
    )


def _has_float_phase(row: dict) -> bool:
    return row["baseline_family_float"]


def answer_table(rows: list[dict]) -> str:
    """Markdown: one line per set-up (task × bits × quantizer × optimizer × init). Where some of
    a set-up's comparisons list the float-phase STE in the baseline family, only those count
    (a win against a weaker family is no answer); among them, the best STE is the one of the
    comparison with the most seeds, and the metaste / PARQ cells the best mean Δ found, with in
    how many of those comparisons that method was `better`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    head = (
        "| set-up | comparisons | seeds | best STE (tuned) | spread (SD) | best metaste method: Δ ± CI → verdict "
        "| best PARQ: Δ ± CI → verdict |"
    )
    out = [head, "|---|---|---|---|---|---|---|"]
    for key, group in groups.items():
        pool = [r for r in group if _has_float_phase(r)] or group
        main = max(pool, key=lambda r: r["seeds"])
        acc = main["metric"] == "accuracy"
        digits = 2 if acc else 3
        unit = "%" if acc else " ppl"
        task, bits, quantizer, optimizer, init, scale = key
        where = f"{task}{' (GPU)' if scale == 'gpu' else ''} {bits}-bit {quantizer}, {optimizer}, from {init}"
        # from a float model the run already starts after a float phase
        family = "" if _has_float_phase(main) or init == "float" else " (family without a float phase)"
        ids = ", ".join(f"`{r['id']}`" for r in pool)
        out.append(
            f"| {where} | {ids} | {main['seeds']} "
            f"| `{main['baseline']}` {main['baseline_mean']:.{digits}f}{unit}{family} | {main['spread']:.{digits}f} "
            f"| {_best_cell(pool, 'ours', digits)} | {_best_cell(pool, 'parq', digits)} |"
        )
    return "\n".join(out)


def _best_cell(pool: list[dict], kind: str, digits: int) -> str:
    found = [(r, r[kind]) for r in pool if r[kind] is not None]
    if not found:
        return "—"
    lower = pool[0]["metric"] != "accuracy"
    row, (label, d) = min(found, key=lambda x: x[1][1].mean if lower else -x[1][1].mean)
    listed = [r for r in pool if label in r["deltas"][kind]]
    wins = sum(r["deltas"][kind][label] == "better" for r in listed)
    tally = f" ({wins} of {len(listed)} comparisons better)" if len(listed) > 1 else ""
    return f"`{label}` {d.mean:+.{digits}f} ± {d.half:.{digits}f} → **{d.verdict}**{tally}"
