"""How much the recorded numbers move when only FOGZO's noise stream changes: every comparison in
``docs/results`` against the same comparison at another git revision whose FOGZO draws its
perturbations from a different generator (same data, initialisations and tuning grids), label by
label, for the methods that draw FOGZO's noise (``--methods``). A label whose evaluation runs are
identical at both revisions is left out. Saved as
``docs/results/noise-stream/moved.json``; `metaste report` puts the table in docs/results.md.

    python benchmarks/noise_stream.py --against abc0860
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from metaste.bench.compare import Comparison
from metaste.bench.report import deltas


def _at(rev: str, path: Path) -> Comparison | None:
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError:
        return None
    return Comparison(**json.loads(text))


def _finals(comp: Comparison, label: str) -> list[float]:
    return [r["final_metric"] for r in sorted(comp.runs, key=lambda r: r["seed"]) if r["label"] == label]


def _summary(comp: Comparison, label: str) -> dict:
    finals = _finals(comp, label)
    d = deltas(comp, label)["metric"] if comp.baseline and label != comp.baseline else None
    return dict(
        lr=comp.choices[label]["lr"],
        metric=sum(finals) / len(finals),
        delta=None if d is None else [d.mean, d.half, d.verdict],
    )


def moved(results: Path, rev: str, methods: set[str]) -> list[dict]:
    """One row per (comparison, label of one of ``methods``) whose evaluation runs differ between
    ``rev`` and now."""
    rows = []
    for path in sorted(results.glob("*/*.comparison.json")):
        old = _at(rev, path)
        if old is None:
            continue
        new = Comparison.load(path)
        of = {r["label"]: r["method"] for r in new.runs}
        for label in new.choices:
            if (
                of.get(label) not in methods
                or label not in old.choices
                or _finals(old, label) == _finals(new, label)
            ):
                continue
            rows.append(
                dict(
                    comparison=path.name.removesuffix(".comparison.json"),
                    label=label,
                    baseline=new.baseline,
                    metric=new.metric,
                    then=_summary(old, label),
                    now=_summary(new, label),
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="the git revision of the other noise stream")
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument(
        "--methods", default="fogzo,fogzo-1sided,nspsa", help="the methods that draw FOGZO's noise"
    )
    args = p.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.against], capture_output=True, text=True, check=True
    ).stdout.strip()
    out = args.results / "noise-stream" / "moved.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/noise_stream.py --against {args.against}"
    rows = moved(args.results, rev, set(args.methods.split(",")))
    out.write_text(json.dumps(dict(against=rev, command=command, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
