"""Do the saved comparisons still reproduce? For every ``*.comparison.json`` under ``--results``,
re-run one evaluation run of each method (its tuned setting, the lowest evaluation seed it did
not diverge on) with the code as it is now, and compare its final test metric with the saved one,
exactly: the runs are deterministic on one thread, so any difference means the method's code
changed the trajectory since the comparison was recorded, and the entry should be rerun
(``metaste compare --suite SUITE --only ID``, then ``make report``).

    OMP_NUM_THREADS=1 python benchmarks/check_results.py --tasks mnist-mlp,digits-mlp --workers 2

Prints one line per (entry, method): the saved metric, the metric now, and ``same`` or ``STALE``.
Costs one run per method and entry (seconds on the MNIST tasks; the CNN and LLaMA tasks take
minutes per run, and ``--init float`` entries train the seed's float model once if it is not
cached).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from metaste.bench.runner import RunSpec, eval_marks, run_one
from metaste.bench.tasks import get_task


def _specs(path: Path) -> list[tuple[str, str, float, RunSpec]]:
    """(entry, label, saved metric, spec) of one run per method of a saved comparison."""
    comp = json.loads(path.read_text())
    s = comp["setup"]
    steps = s["steps"]
    out = []
    for label in sorted({r["label"] for r in comp["runs"]}):
        runs = sorted(
            (r for r in comp["runs"] if r["label"] == label and not r["diverged"]), key=lambda r: r["seed"]
        )
        if not runs:
            continue
        r = runs[0]
        extended = r["steps"] != steps  # the baseline, run on to the equal-compute step counts
        marks = eval_marks(get_task(s["task"], s["scale"]), steps) | set(r["eval_steps"]) if extended else ()
        spec = RunSpec(
            task=s["task"],
            method=r["method"],
            label=label,
            seed=r["seed"],
            lr=r["lr"],
            steps=r["steps"],
            bits=s["bits"],
            quantizer=s["quantizer"],
            options=tuple(sorted(r["options"].items())),
            quant=tuple(sorted(s["quant"].items())),
            optimizer=s["optimizer"],
            scale=s["scale"],
            device=s["device"],
            init=s.get("init", "scratch"),
            schedule_steps=steps,
            marks=tuple(sorted(marks)),
        )
        out.append((path.name.removesuffix(".comparison.json"), label, r["final_metric"], spec))
    return out


def check(paths: list[Path], workers: int = 1) -> list[tuple[str, str, float, float]]:
    """(entry, method label, saved metric, metric now) of one re-run per method of each saved
    comparison in ``paths``."""
    todo = [t for path in paths for t in _specs(path)]
    specs = [spec for *_, spec in todo]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(run_one, specs))
    else:
        results = [run_one(spec) for spec in specs]
    return [(entry, label, saved, r.final_metric) for (entry, label, saved, _), r in zip(todo, results)]


def reproduces(saved: float, now: float) -> bool:
    return saved == now or (math.isnan(saved) and math.isnan(now))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument(
        "--tasks", default="mnist-mlp,digits-mlp", help="comma-separated tasks to check ('all': every one)"
    )
    p.add_argument(
        "--only", default="", help="comma-separated entry ids (default: every entry of those tasks)"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    tasks = None if args.tasks == "all" else set(args.tasks.split(","))
    only = set(filter(None, args.only.split(",")))
    paths = []
    for path in sorted(args.results.rglob("*.comparison.json")):
        entry = path.name.removesuffix(".comparison.json")
        task = json.loads(path.read_text())["setup"]["task"]
        if (tasks is None or task in tasks) and (not only or entry in only):
            paths.append(path)
    rows = check(paths, args.workers)
    stale = 0
    for entry, label, saved, metric in rows:
        same = reproduces(saved, metric)
        stale += not same
        print(f"{entry:45s} {label:40s} saved {saved:.6g}  now {metric:.6g}  {'same' if same else 'STALE'}")
    print(f"{stale} of {len(rows)} runs do not reproduce")


if __name__ == "__main__":
    main()
