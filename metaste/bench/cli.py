"""The ``metaste`` console command.

``metaste compare``: one comparison against the best tuned STE (or ``--suite NAME``: a set of
them); ``metaste report``: rewrite docs/results.md and the README's results block from the
suites' saved JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..quant.quantizers import QUANTIZERS
from ..quant.surrogate_factory import SURROGATES
from .compare import DEFAULT_TUNE_SEEDS, INITS, Protocol, Setup, check, compare
from .pages import write_reports
from .registry import METHODS, _parse_value
from .report import write_outputs
from .suites import SUITES, run_suite
from .tasks import SCALES, TASKS

__all__ = ["main", "build_parser"]


def _key_values(p: argparse.ArgumentParser, items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            p.error(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = _parse_value(v)
    return out


def _floats(p: argparse.ArgumentParser, text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} expects comma-separated numbers, got {text!r}")
        raise


def _ints(p: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} expects comma-separated integers, got {text!r}")
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metaste", description="metaste: QAT beyond the straight-through estimator"
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="train a task with several methods and compare them against the best tuned STE",
        description="Tune every method's lr on separate seeds, pick the best STE variant as the "
        "baseline, evaluate on paired seeds, print the table with verdicts.",
    )
    c.add_argument(
        "--suite", choices=tuple(SUITES), help="run a predefined set of comparisons (see --list-suites)"
    )
    c.add_argument("--only", default=None, metavar="ID,ID", help="with --suite: run only these entries")
    c.add_argument("--task", default="mnist-mlp", choices=tuple(TASKS))
    c.add_argument(
        "--scale", default=None, choices=tuple(SCALES), help="task size preset: cpu (default) or gpu (larger)"
    )
    c.add_argument(
        "--device", default=None, help="cpu (default) or cuda[:i]: model, data and noise live there"
    )
    c.add_argument(
        "--init",
        default="scratch",
        choices=INITS,
        help="scratch: quantized from a random init; float: from the seed's trained float model (cached)",
    )
    c.add_argument(
        "--methods",
        default="fp32,ste,ste-identity",
        help="comma-separated; name[key=value,...] fixes options",
    )
    c.add_argument("--bits", type=int, default=None, help="weight bits (default: the task's)")
    c.add_argument(
        "--quantizer", default=None, choices=QUANTIZERS, help="(default: the task's; 1 bit: dorefa)"
    )
    c.add_argument(
        "--surrogate", default=None, choices=SURROGATES, help="ψ of methods that do not fix their own"
    )
    c.add_argument("--optimizer", default=None, choices=("sgd", "adam", "adamw"), help="base optimizer")
    c.add_argument(
        "--seeds", type=int, default=None, help="number of evaluation seeds (first-seed ...; default 3)"
    )
    c.add_argument("--first-seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    c.add_argument("--lr", type=float, default=None, help="lr of untuned methods (default: the task's)")
    c.add_argument("--tune-lr", default=None, metavar="LR,LR,...", help="lr grid tuned per method")
    c.add_argument(
        "--tune-seeds", default=",".join(map(str, DEFAULT_TUNE_SEEDS)), metavar="S,S,...", help="tuning seeds"
    )
    c.add_argument("--tune", nargs="*", default=[], metavar="KEY=V1,V2", help="method option grids to tune")
    c.add_argument(
        "--baseline", default="best", help="'best' (of the listed STE variants) or a listed method"
    )
    c.add_argument("--no-equal-compute", action="store_true", help="skip the equal-compute baseline runs")
    c.add_argument("--max-extend", type=int, default=3, help="lr grid extensions at an edge (×2 each)")
    c.add_argument("--quant-opt", nargs="*", default=[], metavar="KEY=VALUE", help="quantize_model settings")
    c.add_argument("--method-opt", nargs="*", default=[], metavar="KEY=VALUE", help="method options")
    c.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)"
    )
    c.add_argument("--out", type=Path, default=Path("results"), help="folder for the table, JSON and PNG")
    c.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    c.add_argument("--list-suites", action="store_true", help="print the suites and exit")
    r = sub.add_parser(
        "report", help="rewrite docs/results.md and the README results block from saved suites"
    )
    r.add_argument("--results", type=Path, default=Path("docs/results"), help="where the suites' JSON are")
    r.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    r.add_argument("--readme", type=Path, default=Path("README.md"))
    return p


def _compare(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.list_methods:
        for name, m in METHODS.items():
            opts = f" [options: {', '.join(m.options)}]" if m.options else ""
            print(f"{name:20s} {m.description}{opts}")
        return 0
    if args.list_suites:
        for name, entries in SUITES.items():
            print(f"{name:16s} " + "; ".join(e.title for e in entries))
        return 0
    if args.workers < 1:
        p.error(f"--workers must be ≥ 1, got {args.workers}")
    _check_writable(p, args.out)
    if args.suite:
        only = [x for x in (args.only or "").split(",") if x] or None
        try:
            return run_suite(
                args.suite,
                args.out,
                workers=args.workers,
                only=only,
                device=args.device,
                scale=args.scale,
                steps=args.steps,
                seeds=args.seeds,
            )
        except ValueError as e:
            p.error(str(e))
    quant = _key_values(p, args.quant_opt, "--quant-opt")
    if args.surrogate is not None:
        quant["surrogate"] = args.surrogate
    tune = {}
    for item in args.tune:
        k, eq, v = item.partition("=")
        if not eq or not v:
            p.error(f"--tune expects KEY=V1,V2,..., got {item!r}")
        tune[k] = [_parse_value(x) for x in v.split(",") if x.strip()]
    setup = Setup(
        task=args.task,
        bits=args.bits,
        quantizer=args.quantizer,
        optimizer=args.optimizer,
        steps=args.steps,
        lr=args.lr,
        quant=quant,
        method_opts=_key_values(p, args.method_opt, "--method-opt"),
        scale=args.scale or "cpu",
        device=args.device or "cpu",
        init=args.init,
    )
    protocol = Protocol(
        methods=[m for m in _split_methods(args.methods) if m],
        seeds=list(range(args.first_seed, args.first_seed + (3 if args.seeds is None else args.seeds))),
        tune_seeds=_ints(p, args.tune_seeds, "--tune-seeds"),
        tune_lr=None if args.tune_lr is None else _floats(p, args.tune_lr, "--tune-lr"),
        tune=tune,
        baseline=args.baseline,
        equal_compute=not args.no_equal_compute,
        max_extend=args.max_extend,
    )
    try:
        check(setup, protocol)
    except ValueError as e:
        p.error(str(e))
    comp = compare(setup, protocol, workers=args.workers)
    write_outputs(comp, args.out / args.task)
    return 0


def _check_writable(p: argparse.ArgumentParser, out: Path) -> None:
    """Refuse an --out folder that cannot be written before any run, not after the last one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        p.error(f"--out {out}: cannot write there ({e.strerror or e})")


def _split_methods(text: str) -> list[str]:
    """Split on commas outside brackets: ``ste,fogzo[n=2,beta_min=0.9]`` → two methods."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "report":
        for path in write_reports(args.results, args.doc, args.readme):
            print(f"wrote {path}")
        return 0
    sub = p._subparsers._group_actions[0].choices["compare"]  # type: ignore[union-attr]
    return _compare(sub, args)


if __name__ == "__main__":
    sys.exit(main())
