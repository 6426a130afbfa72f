"""One command for the cost benchmarks: runs bench_substrate, bench_fogzo, bench_hyperste and
bench_new_methods (PEGE, JacQuant, the calibrated surrogate and torchao's PARQ; one thread each, interleaved repetitions, CPU time; peak memory per
configuration in a fresh process, :mod:`_measure`) and writes the README's cost table between
``<!-- results:cost -->`` and ``<!-- /results:cost -->`` — nothing in that block is typed by hand.
Each row names its target and whether the measurement meets it (docs/design.md §4.5, §3.5)::

    OMP_NUM_THREADS=1 python benchmarks/run_all.py [--readme README.md] [--json cost.json] [--quick]

``make bench`` runs it. On the shared 2-core machine a full run takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402,F401  (puts the checkout's metaste first on sys.path)
import bench_fogzo  # noqa: E402
import bench_hyperste  # noqa: E402
import bench_new_methods  # noqa: E402
import bench_substrate  # noqa: E402

from metaste.bench import models  # noqa: E402

BEGIN, END = "<!-- results:cost -->", "<!-- /results:cost -->"
MODEL_NAMES = {
    "mlp": "MLP 784-10-10, batch 64",
    "wide": "MLP 784-512-512-10, batch 256",
    "cnn": "CNN (2 conv + BN), batch 64",
    "llama": "tiny LLaMA (2 blocks, dim 128), 16 × 64 tokens",
}


def substrate(reps: int) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (256,), generator=g)
    cases = {
        "MLP 784-512-512-10": (lambda: models.mlp((784, 512, 512, 10)), torch.randn(256, 784, generator=g)),
        "ResNet (1 block/stage, width 8)": (lambda: models.ResNet(blocks=1, width=8), torch.randn(256, 1, 28, 28, generator=g)),
    }  # fmt: skip
    out = {}
    for name, (make, x) in cases.items():
        t = bench_substrate.time_variants(make, x, y, reps)
        out[name] = {
            "fake-quant / float": t["2-bit ste"] / t["float"],
            "learnable / fixed": max(t["2-bit slste"], t["2-bit plste"]) / t["2-bit ste"],
        }
    return out


def _verdict(value: float, target: float) -> str:
    return "**met**" if value <= target else "**missed**"


#: (model, steps per round) of bench_new_methods; the targets of docs/design.md §3.5
NEW_MODELS = {"mlp": 200, "wide": 50}
NEW_TARGETS = {"pege": 1.15, "jacquant": 1.15, "jacquant-storm": 1.15, "calibrated": 1.25}
NEW_NAMES = {
    "pege": "PEGE (random masks)",
    "jacquant": "JacQuant, no variance reduction",
    "jacquant-storm": "JacQuant, STORM",
    "jacquant-storm-nophase": "JacQuant, STORM with a second pass every step",
    "calibrated": "calibrated surrogate (every = 10, n = 1)",
}


def new_method_rows(new: dict) -> list[tuple[str, ...]]:
    """PEGE, JacQuant and the calibrated surrogate against plain STE; torchao's PARQ (its
    QuantOptimizer around SGD, on the float model it quantizes) against plain SGD on that model."""
    rows = []
    for model, r in new.items():
        name = MODEL_NAMES[model]
        ste = statistics.median(r["ste"]["ms"])
        for key, label in NEW_NAMES.items():
            q = r[key]["ratio"]
            target = NEW_TARGETS.get(key)
            rows.append(
                (
                    f"{label}: time",
                    name,
                    f"≤ {target}× STE" if target else "—",
                    f"{_measure.fmt(_measure.summary(q))}× ({statistics.median(r[key]['ms']):.2f} ms, STE {ste:.2f} ms)",
                    _verdict(statistics.median(q), target) if target else "",
                )
            )
        sgd = statistics.median(r["sgd-float"]["ms"])
        for key, label in (
            ("parq", "PARQ `QuantOptimizer`, soft prox (peer)"),
            ("parq-hard", "PARQ, hard prox (peer)"),
        ):
            if key in r:
                q = r[key]["ratio_sgd"]
                rows.append(
                    (f"{label}: time", name, "— (vs plain SGD, float model)",
                     f"{_measure.fmt(_measure.summary(q))}× ({statistics.median(r[key]['ms']):.2f} ms, SGD {sgd:.2f} ms)", "")
                )  # fmt: skip
    return rows


def table(sub: dict, fog: dict, hyp: dict, new: dict, meta: str) -> str:
    rows = []
    for model, r in sub.items():
        for key, target in (("fake-quant / float", 1.3), ("learnable / fixed", 1.05)):
            v = r[key]
            what = (
                "fake-quant vs float"
                if key.startswith("fake")
                else "learnable ψ vs fixed ψ (worst of SLSTE, PLSTE)"
            )
            rows.append((what, model, f"≤ {target}×", f"{v:.3f}×", _verdict(v, target)))
    for model, r in fog.items():
        name = MODEL_NAMES[model]
        limit = 0.30 if model == "mlp" else 0.10
        for cfg, label in (("n1-inplace", "n = 1, restore='inplace' (default)"), ("n1-copy", "n = 1, restore='copy'"),
                           ("n4-inplace", "n = 4, restore='inplace' (default)")):  # fmt: skip
            row = r["rows"][cfg]
            rows.append(
                (
                    f"FOGZO {label}: time beyond its forwards",
                    name,
                    f"≤ +{limit * 100:.0f} % of an STE step",
                    f"{row['overhead'] * 100:+.0f} % ({row['cpu_ms'][0]:.1f} ms, STE {r['t_ste_ms'][0]:.1f} ms: "
                    f"× {_measure.fmt(row['cpu_ratio'])}, floor {row['floor']:.2f})",
                    _verdict(row["overhead"], limit),
                )
            )
        for cfg in ("n1-inplace", "n1-copy"):
            m = r["rows"][cfg]["mem_ratio"]
            mib = (
                f"{m * r['ste_peak_mib']:.1f} vs {r['ste_peak_mib']:.1f} MiB; "
                f"STE with its gradients kept {r['ste_kept_peak_mib']:.1f} MiB"
            )
            rows.append(
                (
                    f"FOGZO peak memory, restore='{cfg[3:]}'",
                    name,
                    "≤ 1.05×",
                    f"{m:.3f}× ({mib})",
                    _verdict(m, 1.05),
                )
            )
    for arch, rs in hyp.items():
        name = {"mlp": "MLP 784-512-256-10, batch 128", "cnn": "CNN (2 conv + BN), batch 128"}[arch]
        for cfg, (tt, tm) in bench_hyperste.TARGETS.items():
            row = rs[cfg]
            rows.append(
                (f"HyperSTE {cfg}: time", name, f"≤ {tt}×", _measure.fmt(row["cpu_ratio"], digits=2) + "×",
                 _verdict(row["cpu_ratio"][0], tt))
            )  # fmt: skip
            rows.append(
                (f"HyperSTE {cfg}: peak memory", name, f"≤ {tm}×",
                 f"{row['mem_ratio']:.2f}× ({row['peak_mib']:.1f} vs {rs[row['ref']]['peak_mib']:.1f} MiB)",
                 _verdict(row["mem_ratio"], tm))
            )  # fmt: skip
    rows += new_method_rows(new)
    lines = [
        meta,
        "",
        "| what | model | target | measured (median, min–max over rounds) | |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_readme(path: str, block: str) -> None:
    with open(path) as f:
        text = f.read()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {BEGIN} … {END} block")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", help="rewrite the cost block of this README")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument(
        "--from-json", help="render the block from a --json file of an earlier run (no measuring)"
    )
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        sub, fog, hyp, new = saved["substrate"], saved["fogzo"], saved["hyperste"], saved["new_methods"]
    else:
        sub = substrate(8 if args.quick else 30)
        fog = bench_fogzo.run(reps=reps, steps=3)
        hyp = bench_hyperste.run(argparse.Namespace(reps=reps + 2, steps=5, batch=128, models="mlp,cnn"))
        new = {m: bench_new_methods.measure(m, steps, reps) for m, steps in NEW_MODELS.items()}
    meta = (
        f"`OMP_NUM_THREADS=1 python benchmarks/run_all.py --readme README.md` (torch {torch.__version__}, one "
        f"thread, CPU time; FOGZO {reps} rounds × 3 steps, HyperSTE {reps + 2} × 5, PEGE, JacQuant, calibrated and PARQ "
        f"{reps} × {NEW_MODELS['mlp']} (wide: × {NEW_MODELS['wide']}), substrate "
        f"{8 if args.quick else 30} rounds; peak memory: peak resident bytes over two consecutive steps in a fresh process). "
        "Ratios are to plain STE in the same run; the shared machine moves them by a few percent, and FOGZO's "
        "overhead, which subtracts k·t_fwd, by more at n = 4 (k = 8). The 784-10-10 MLP's whole step peaks "
        "below 1 MiB, where page rounding decides its memory ratios."
    )
    block = table(sub, fog, hyp, new, meta)
    print(block)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"substrate": sub, "fogzo": fog, "hyperste": hyp, "new_methods": new}, f, indent=1)
    if args.readme:
        write_readme(args.readme, block)


if __name__ == "__main__":
    main()
