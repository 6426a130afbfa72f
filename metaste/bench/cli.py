"""The ``metaste`` console command (``metaste compare ...``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..quant.quantizers import QUANTIZERS
from ..quant.surrogates import SURROGATES
from .compare import compare, format_table, plot_curves, save_results
from .methods import METHODS
from .tasks import TASKS, get_task

__all__ = ["main"]


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _key_values(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = _parse_value(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metaste", description="metaste: QAT beyond the straight-through estimator"
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="train a task with several methods and compare them against plain STE")
    c.add_argument("--task", default="mnist-mlp", choices=tuple(TASKS))
    c.add_argument("--methods", default="fp32,ste", help="comma-separated; see --list-methods")
    c.add_argument("--bits", type=int, default=None, help="weight bits (default: the task's)")
    c.add_argument(
        "--quantizer",
        default=None,
        choices=QUANTIZERS,
        help="weight quantizer (default: the task's; 1 bit: dorefa)",
    )
    c.add_argument(
        "--surrogate",
        default=None,
        choices=SURROGATES,
        help="surrogate ψ of the quantized methods that do not fix their own (default: ste)",
    )
    c.add_argument("--seeds", type=int, default=3, help="number of paired seeds (0..N-1)")
    c.add_argument("--first-seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    c.add_argument("--lr", type=float, default=None, help="base learning rate (default: the task's)")
    c.add_argument("--quant-opt", nargs="*", default=[], metavar="KEY=VALUE", help="quantize_model overrides")
    c.add_argument(
        "--method-opt", nargs="*", default=[], metavar="KEY=VALUE", help="RunContext.extra for methods"
    )
    c.add_argument("--reference", default="ste", help="method the paired differences are taken against")
    c.add_argument("--out", type=Path, default=Path("results"), help="folder for results.json and the PNGs")
    c.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        for name, m in METHODS.items():
            print(f"{name:24s} {m.description}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    if args.lr is not None:
        task = dataclasses.replace(task, lr=args.lr)  # a copy: the registry keeps its default
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bits = args.bits if args.bits is not None else task.bits
    steps = args.steps if args.steps is not None else task.steps
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out = args.out / args.task
    quant = _key_values(args.quant_opt, "--quant-opt")
    if args.surrogate is not None:
        quant["surrogate"] = args.surrogate
    print(
        f"# metaste compare: task={task.name} ({task.description}); bits={bits}, steps={steps}, seeds={seeds}"
    )
    results = compare(
        task,
        methods,
        seeds,
        steps=steps,
        bits=bits,
        quantizer=args.quantizer or task.quantizer,
        quant_overrides=quant,
        extra=_key_values(args.method_opt, "--method-opt"),
        out=out,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    table = format_table(task, results, args.reference if args.reference in methods else None)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    json_path = save_results(results, out / "results.json")
    png_path = plot_curves(task, results, out / "curves.png")
    print(f"wrote {out / 'table.md'}, {json_path}, {json_path.with_suffix('.csv')} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
