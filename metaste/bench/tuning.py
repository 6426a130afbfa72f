"""The tuning phase of ``metaste compare`` (step 1 of :mod:`metaste.bench.compare`).

Every tuned method runs each setting of its grid (learning rates × options) on the tuning seeds,
without the validation part of the training set; the setting with the lowest mean validation
loss wins (a diverged seed makes a setting's score +inf; ties go to the smaller learning rate).
A winning learning rate at an edge of its grid is extended by ×2 in that direction, up to
``max_extend`` times, and every extension is recorded in the notes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .runner import RunResult, RunSpec

__all__ = ["Tuning", "tune"]

#: label → (method name, learning rates, option settings)
Grids = dict[str, tuple[str, list[float], list[dict]]]


@dataclass
class Tuning:
    choices: dict[str, dict]  # label → lr, options, val_loss, settings tried, lr grid
    records: list[dict]  # one per tuning run
    notes: list[str]  # the grid extensions


def tune(
    grids: Grids,
    tuned: list[str],
    seeds: list[int],
    max_extend: int,
    spec: Callable[..., RunSpec],
    run: Callable[[list[RunSpec]], list[RunResult]],
    say: Callable[[str], None],
) -> Tuning:
    """Tune the labels in ``tuned`` (the others keep the first setting of their grid).
    ``spec(label, method, lr, options, seed, holdout=True)`` makes a run, ``run`` runs a batch."""
    tried: dict[str, dict[tuple[float, str], list[RunResult]]] = {label: {} for label in tuned}
    pending = [(label, lr, o) for label in tuned for lr in grids[label][1] for o in grids[label][2]]
    extensions = dict.fromkeys(tuned, 0)
    edge: dict[str, float] = {}
    records: list[dict] = []
    while pending:
        specs = [
            spec(label, grids[label][0], lr, o, seed, holdout=True)
            for label, lr, o in pending
            for seed in seeds
        ]
        say(f"# tuning: {len(specs)} runs on seeds {seeds}")
        for s, r in zip(specs, run(specs)):
            opts = dict(s.options)
            tried[s.label].setdefault((s.lr, json.dumps(opts, sort_keys=True)), []).append(r)
            records.append(
                dict(label=s.label, lr=s.lr, options=opts, seed=s.seed)
                | dict(val_loss=r.val_loss, diverged=r.diverged, final_loss=r.final_loss)
            )
        pending = []
        for label in tuned:
            (lr, okey), score = best(tried[label])
            lrs = sorted({x for x, k in tried[label] if k == okey})
            at_edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1]) and math.isfinite(score)
            if at_edge and extensions[label] < max_extend:
                new = lr * 2 if lr == lrs[-1] else lr / 2
                extensions[label] += 1
                say(f"# {label}: best lr {lr:g} at the edge of {lrs}; grid extended to {new:g}")
                pending.append((label, new, json.loads(okey)))
            elif at_edge:
                edge[label] = lr
    notes = []
    for label, k in extensions.items():
        if k:
            lrs = sorted({x for x, _ in tried[label]})
            notes.append(
                f"{label}: lr grid extended {k}× (×2 each) to [{lrs[0]:g} … {lrs[-1]:g}]"
                + (f"; best {edge[label]:g} is still at its edge" if label in edge else "")
            )
    return Tuning(_choices(grids, tried), records, notes)


def _choices(grids: Grids, tried: dict[str, dict[tuple[float, str], list[RunResult]]]) -> dict[str, dict]:
    choices: dict[str, dict] = {}
    for label, (_, lrs, opts) in grids.items():
        if label in tried:
            (lr, okey), score = best(tried[label])
            choices[label] = dict(
                lr=lr,
                options=json.loads(okey),
                val_loss=score,
                settings=len(tried[label]),
                grid=sorted({x for x, _ in tried[label]}),
            )
        else:
            choices[label] = dict(lr=lrs[0], options=opts[0], val_loss=math.nan, settings=1, grid=lrs)
    return choices


def best(tried: dict[tuple[float, str], list[RunResult]]) -> tuple[tuple[float, str], float]:
    """The setting with the lowest mean validation loss (any diverged seed makes it +inf)."""

    def score(rs: list[RunResult]) -> float:
        vals = [r.val_loss for r in rs]
        return float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else math.inf

    key = min(tried, key=lambda k: (score(tried[k]), k[0]))
    return key, score(tried[key])
