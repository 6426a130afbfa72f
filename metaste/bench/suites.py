"""The comparison suites (``metaste compare --suite NAME``) and the regenerated results pages.

Each suite is a list of comparisons that mirror a source's experiment; every comparison tunes
every method (the STE baselines included) on the tuning seeds. ``run_suite`` saves one JSON and
one PNG per comparison under ``OUT/NAME/``; ``write_reports`` rebuilds ``docs/results.md`` and the
README's results block from those files, so no number in them is typed by hand.

Size: ~480 lines, over the ~400 the package aims for, on purpose: about 300 of them are the suite
table itself (data: each comparison with its title and its note), which reads best in one place;
the code around it (running a suite, writing the pages) is ~150 lines.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .compare import Comparison, Protocol, Setup, compare

__all__ = ["SuiteEntry", "SUITES", "run_suite", "write_reports", "replace_block"]

LR_SGD = [0.025, 0.05, 0.1, 0.2]
LR_ADAM = [0.0025, 0.005, 0.01, 0.02]


@dataclass(frozen=True)
class SuiteEntry:
    id: str
    title: str
    setup: Setup
    protocol: Protocol
    note: str = ""  # where the suite departs from the source (seeds, steps) and why, or what it confirms


# The FOGZO paper's MNIST experiment: MLP 784-10-10, both layers 2-bit with a fixed step set once
# from the LSQ init formula, SGD, batch 64, 3,000 steps.
_FIXED_LSQ_INIT = {"fixed_init": "lsq", "keep_last": False}
_FOGZO_METHODS = [
    "ste",
    "ste-identity",
    "fogzo",
    "fogzo[beta_min=0.999]",
    "fogzo-1sided",
    "fogzo[ste_fraction=0.7]",
    "nspsa",
]


def _mnist(
    bits: int, quantizer: str, optimizer: str, methods: list[str], seeds: int, first_seed: int = 0, **kw
) -> tuple:
    setup = Setup(
        "mnist-mlp",
        bits=bits,
        quantizer=quantizer,
        optimizer=optimizer,
        quant=dict(_FIXED_LSQ_INIT) if quantizer == "fixed" else {},
        steps=kw.pop("steps", None),
    )
    lrs = LR_SGD if optimizer == "sgd" else LR_ADAM
    seeds_ = list(range(first_seed, first_seed + seeds))
    return setup, Protocol(methods=methods, seeds=seeds_, tune_lr=lrs, **kw)


_NEW_METHODS = ["ste", "ste-identity", "calibrated", "pege"]
_NEW_TUNE = {"lam": [0.01, 0.1], "lam_init": [0.0, 1.0]}
_HYPER_METHODS = ["ste", "ste-identity", "ste-pwl", "analytical", "delayed-sgd", "delayed-sgd-plste"]

SUITES: dict[str, list[SuiteEntry]] = {
    "demo": [
        SuiteEntry(
            "demo",
            "MNIST MLP 784-10-10, 2-bit LSQ (last layer float), SGD, 1,500 steps (`make demo`)",
            Setup("mnist-mlp"),
            Protocol(
                methods=["fp32", "ste", "ste-identity", "fogzo", "delayed-sgd"],
                seeds=list(range(5)),
                tune_lr=LR_SGD,
            ),
            "5 evaluation seeds: `make demo` must finish in minutes",
        )
    ],
    "fogzo-mnist": [
        SuiteEntry(
            "fogzo-mnist-2bit",
            "FOGZO paper's MNIST MLP 784-10-10, both layers 2-bit, fixed LSQ-init step, SGD, 3,000 steps",
            *_mnist(2, "fixed", "sgd", _FOGZO_METHODS, 20, steps=3000),
        )
    ],
    "lsq-mnist": [
        SuiteEntry(
            f"lsq-mnist-2bit-{opt}",
            f"MNIST MLP 784-10-10, 2-bit LSQ (last layer float), {opt.upper()}, 1,500 steps",
            *_mnist(2, "lsq", opt, ["ste", "ste-identity", "fogzo", f"delayed-{opt}"], 10),
        )
        for opt in ("sgd", "adam")
    ]
    + [
        SuiteEntry(
            "lsq-mnist-2bit-sgd-confirm",
            "MNIST MLP 784-10-10, 2-bit LSQ, SGD, 1,500 steps: `delayed-sgd` against the identity STE "
            "on 20 fresh seeds",
            *_mnist(2, "lsq", "sgd", ["ste-identity", "delayed-sgd"], 20, first_seed=10),
            "a confirmation of the one `better` verdict of `lsq-mnist-2bit-sgd` (seeds 0–9), whose "
            "protocol it repeats (same tuning seeds and grid) on evaluation seeds 10–29",
        )
    ],
    "hyperste": [
        SuiteEntry(
            f"hyperste-mnist-{bits}bit",
            f"MNIST MLP 784-10-10, both layers {bits}-bit "
            + ("DoReFa" if bits == 1 else "fixed LSQ-init step")
            + ", SGD, 1,500 steps: HyperSTE analytical / delayed (per element)",
            *_mnist(bits, "dorefa" if bits == 1 else "fixed", "sgd", _HYPER_METHODS, 10),
        )
        for bits in (2, 1)
    ]
    + [
        SuiteEntry(
            "hyperste-mnist-2bit-channel",
            "MNIST MLP 784-10-10, both layers 2-bit fixed LSQ-init step, SGD, 1,500 steps: HyperSTE "
            "delayed SLSTE / PLSTE / DLSTE with one surrogate parameter per output channel",
            Setup(
                "mnist-mlp",
                bits=2,
                quantizer="fixed",
                optimizer="sgd",
                quant={**_FIXED_LSQ_INIT, "granularity": "channel"},
            ),
            Protocol(
                methods=[
                    "ste",
                    "ste-identity",
                    "ste-pwl",
                    "delayed-sgd",
                    "delayed-sgd-plste",
                    "delayed-sgd-dlste",
                ],
                seeds=list(range(10)),
                tune_lr=LR_SGD,
            ),
        )
    ],
    "fashion-resnet": [
        SuiteEntry(
            f"fashion-resnet-{bits}bit-{opt}",
            f"Fashion-MNIST subset, ResNet-8-style, {bits}-bit, {opt.upper()}, 300 steps",
            Setup("fashion-resnet", bits=bits, optimizer=opt, steps=300),
            Protocol(
                methods=["ste", "ste-identity", "fogzo"],
                seeds=list(range(4)),
                tune_seeds=[100, 101],
                tune_lr=[0.025, 0.05, 0.1] if opt == "sgd" else [0.0025, 0.005, 0.01],
                max_extend=1,
            ),
            "4 evaluation seeds, 2 tuning seeds, 300 steps, 3-point lr grid (one extension): "
            "a ResNet step costs ~80 ms on one CPU core, so the ≥ 10 seeds of the protocol do not fit",
        )
        for bits in (2, 1)
        for opt in ("sgd", "adam")
    ],
    "kjv-llama": [
        SuiteEntry(
            f"kjv-llama-{bits}bit",
            f"KJV characters, tiny LLaMA (1M), {bits}-bit LSQ, AdamW, 150 steps",
            Setup("kjv-llama", bits=bits, steps=150),
            Protocol(
                methods=["ste", "ste-identity", "fogzo"],
                seeds=list(range(4)),
                tune_seeds=[100, 101],
                tune_lr=[1e-3, 2e-3, 4e-3],
                max_extend=1,
            ),
            "4 evaluation seeds, 2 tuning seeds, 150 steps, 3-point lr grid (one extension), AdamW only: "
            "a step costs ~250 ms on one CPU core",
        )
        for bits in (4, 2)
    ],
    "new-methods": [
        SuiteEntry(
            "new-methods-mnist-2bit",
            "FOGZO paper's MNIST MLP 784-10-10, both layers 2-bit, fixed LSQ-init step, SGD, 3,000 steps: "
            "calibrated surrogate and PEGE (docs/methods/calibrated.md, docs/methods/pege.md)",
            *_mnist(
                2,
                "fixed",
                "sgd",
                ["ste", "ste-identity", "calibrated", "pege", "pege-error"],
                10,
                steps=3000,
                tune=_NEW_TUNE,
            ),
            "10 evaluation seeds; PEGE's λ and the calibrated start leak λ₀ are tuned with the lr; JacQuant "
            "has its own entries (`jacquant-*`)",
        )
    ]
    + [
        SuiteEntry(
            f"new-methods-{name}",
            f"MNIST MLP 784-10-10, {title}: calibrated surrogate and PEGE",
            *_mnist(*args, _NEW_METHODS, 10, tune=_NEW_TUNE, **kw),
            note,
        )
        for name, title, args, kw, note in [
            (
                "mnist-1bit",
                "both layers 1-bit DoReFa, SGD, 1,500 steps",
                (1, "dorefa", "sgd"),
                {},
                "the set-up of `hyperste-mnist-1bit`; JacQuant is not in it: its slope is fitted to "
                "round-to-nearest codes (fixed or LSQ quantizers), which a 1-bit sign quantizer has not",
            ),
            (
                "mnist-1bit-adam",
                "both layers 1-bit DoReFa, Adam, 1,500 steps",
                (1, "dorefa", "adam"),
                {},
                "`new-methods-mnist-1bit` with Adam",
            ),
            (
                "mnist-2bit-adam",
                "both layers 2-bit, fixed LSQ-init step, Adam, 3,000 steps",
                (2, "fixed", "adam"),
                {"steps": 3000},
                "`new-methods-mnist-2bit` with Adam",
            ),
            (
                "lsq-mnist-2bit",
                "2-bit LSQ (last layer float), SGD, 1,500 steps",
                (2, "lsq", "sgd"),
                {},
                "the set-up of `lsq-mnist-2bit-sgd`",
            ),
        ]
    ]
    + [
        SuiteEntry(
            f"new-methods-{name}-confirm",
            f"MNIST MLP 784-10-10, {title}: `{method}` against the identity STE on 20 fresh seeds",
            *_mnist(*args, ["ste-identity", method], 20, first_seed=10, tune=tune),
            f"a confirmation of the `better` verdict of `new-methods-{name}` (seeds 0–9), whose "
            "protocol it repeats (same tuning seeds and grids) on evaluation seeds 10–29",
        )
        for name, title, args, method, tune in [
            (
                "mnist-1bit",
                "both layers 1-bit DoReFa, SGD, 1,500 steps",
                (1, "dorefa", "sgd"),
                "pege",
                {"lam": _NEW_TUNE["lam"]},
            ),
            (
                "lsq-mnist-2bit",
                "2-bit LSQ (last layer float), SGD, 1,500 steps",
                (2, "lsq", "sgd"),
                "calibrated",
                {"lam_init": _NEW_TUNE["lam_init"]},
            ),
        ]
    ]
    + [
        SuiteEntry(
            "new-methods-mnist-1bit-ablation",
            "MNIST MLP 784-10-10, both layers 1-bit DoReFa, SGD, 1,500 steps: which part of PEGE gains",
            *_mnist(
                1,
                "dorefa",
                "sgd",
                [
                    "ste-identity",
                    "pege[lam=0.01]",
                    "pege[lam=0]",  # no discretization-error penalty
                    "pege[lam=0.01,delta=0]",  # no EWGS term: the STE's gradient on replaced elements
                    "pege[lam=0.01,replace_frac=0.001]",  # no curriculum: every element replaced at once
                ],
                10,
                first_seed=30,
            ),
            "PEGE with one part removed at a time, λ fixed at the tuned 0.01, lr tuned for each; "
            "evaluation seeds 30–39 (fresh)",
        )
    ]
    + [
        SuiteEntry(
            f"new-methods-{task}-{bits}bit",
            f"{title}, {bits}-bit, {opt.upper()}, {steps} steps: PEGE (λ = 0.01, the 1-bit MNIST choice)",
            Setup(task, bits=bits, optimizer=opt, steps=steps),
            Protocol(
                methods=["ste", "ste-identity", "pege[lam=0.01]"],
                seeds=list(range(4)),
                tune_seeds=[100, 101],
                tune_lr=lrs,
                max_extend=1,
            ),
            f"does PEGE's 1-bit MNIST gain carry over? 4 evaluation seeds, 2 tuning seeds, {steps} steps, "
            "3-point lr grid (one extension), λ fixed: the CPU budget of the `fashion-resnet` / "
            "`kjv-llama` suites",
        )
        for task, title, bits, opt, steps, lrs in [
            ("fashion-resnet", "Fashion-MNIST subset, ResNet-8-style", 1, "sgd", 300, [0.025, 0.05, 0.1]),
            ("kjv-llama", "KJV characters, tiny LLaMA (1M), LSQ", 2, "adamw", 150, [1e-3, 2e-3, 4e-3]),
        ]
    ]
    + [
        SuiteEntry(
            f"jacquant-{name}",
            f"MNIST MLP 784-10-10, {title}: JacQuant without and with STORM",
            *_mnist(*args, ["ste", "ste-identity", "jacquant", "jacquant-storm"], 10, **kw),
            "10 evaluation seeds; JacQuant's defaults (G = 128, K = 50, dither fit)",
        )
        for name, title, args, kw in [
            (
                "mnist-2bit",
                "both layers 2-bit, fixed LSQ-init step, SGD, 3,000 steps",
                (2, "fixed", "sgd"),
                {"steps": 3000},
            ),
            (
                "mnist-2bit-adam",
                "both layers 2-bit, fixed LSQ-init step, Adam, 3,000 steps",
                (2, "fixed", "adam"),
                {"steps": 3000},
            ),
            ("lsq-mnist-2bit", "2-bit LSQ (last layer float), SGD, 1,500 steps", (2, "lsq", "sgd"), {}),
        ]
    ],
}


def run_suite(name: str, out: Path, workers: int = 1, only: list[str] | None = None) -> int:
    """Run the comparisons of suite ``name`` (those named in ``only``, default all); save
    ``OUT/NAME/<id>.comparison.json``, ``.table.md`` and ``.curves.png``."""
    from .report import write_outputs

    ids = [e.id for e in SUITES[name]]
    unknown = sorted(set(only or ()) - set(ids))
    if unknown:
        raise ValueError(f"suite {name!r} has no entry {unknown}; its entries are {', '.join(ids)}")
    for entry in SUITES[name]:
        if only and entry.id not in only:
            continue
        print(f"## {entry.id}: {entry.title}", flush=True)
        comp = compare(entry.setup, entry.protocol, workers=workers)
        write_outputs(comp, out / name, stem=f"{entry.id}.")
    return 0


# --- the regenerated pages --------------------------------------------------------------------


def replace_block(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``."""
    pattern = re.compile(
        rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        raise ValueError(f"no <!-- results:{name} --> ... <!-- /results:{name} --> block to replace")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def _load(results: Path) -> dict[str, list[tuple[SuiteEntry, Comparison | None]]]:
    found = {}
    for name, entries in SUITES.items():
        found[name] = [
            (e, Comparison.load(p) if (p := results / name / f"{e.id}.comparison.json").exists() else None)
            for e in entries
        ]
    return found


def tally_verdicts(comp: Comparison, tally: dict[str, dict[str, list[str]]]) -> None:
    """Add each method's test-metric verdicts (equal steps, equal compute) of ``comp`` to ``tally``:
    method → verdict → the comparisons (task, bits, optimizer) where it was reached."""
    from .report import deltas

    s = comp.setup
    where = f"{s['task']} {s['bits']}-bit {s['quantizer']} {s['optimizer']}"
    for label in comp.choices:
        if comp.baseline is None or label in (comp.baseline, "fp32"):
            continue
        d = deltas(comp, label)
        for key, tag in (("metric", ""), ("metric@compute", " (compute)")):
            if key in d:
                tally.setdefault(label, {}).setdefault(d[key].verdict + tag, []).append(where)


def tally_table(tally: dict[str, dict[str, list[str]]]) -> str:
    """Per method: in how many comparisons its test metric was better / no different / worse than
    the best tuned STE, at equal steps and at equal compute."""
    cols = ["better", "no difference", "worse"]
    head = "| method | " + " | ".join(f"{c}, equal steps" for c in cols) + " | "
    head += " | ".join(f"{c}, equal compute" for c in cols) + " |"
    rows = [head, "|" + "---|" * (1 + 2 * len(cols))]
    for label, verdicts in tally.items():
        cells = [str(len(verdicts.get(c, []))) for c in cols]
        cells += [str(len(verdicts.get(c + " (compute)", []))) for c in cols]
        rows.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_reports(results: Path, doc: Path, readme: Path) -> list[Path]:
    """Rewrite ``doc`` (every suite's tables and plots) and the ``results:suites`` block of
    ``readme`` (one verdict line per method and comparison) from the saved JSON."""
    from .report import format_table, verdict_lines

    found = _load(results)
    rel = lambda p: Path(p).relative_to(doc.parent).as_posix()  # noqa: E731
    parts = [
        "# Results: every method against the best tuned STE",
        "",
        "Regenerated by `make results` (runs the suites, then `metaste report`); do not edit by hand.",
        "Protocol: each method's learning rate (and any `--tune` option) is tuned on seeds 100+, by the",
        "validation loss on a part of the training set held out for tuning; the baseline is the best of the",
        "listed plain-STE variants at its tuned lr; Δ = method − baseline, paired over the evaluation seeds,",
        "± the t-based 95 % CI, (seeds better / pairs). A verdict is `better`/`worse` only when the CI",
        "excludes 0. *Equal compute*: the baseline's own run read off at the step count that costs the same",
        "forward-pass equivalents as the method's run.",
        "Each verdict is one 95 % test; over the dozens of verdicts on this page a few `better` or `worse`",
        "are expected by chance alone, so a lone `better` is a lead to confirm on fresh seeds, not a result.",
        "The FOGZO rows of `fashion-resnet` were recorded before FOGZO's noise became a counter-based",
        "hash (the same distribution, other draws); `make results` reruns them with the current",
        "generator (the other suites were rerun with it).",
        "",
    ]
    summary = []
    tally: dict[str, dict[str, list[str]]] = {}
    demo = "*Not run yet (`make results`).*"
    for name, entries in found.items():
        parts += [f"## Suite `{name}`", "", f"`metaste compare --suite {name}`", ""]
        for entry, comp in entries:
            parts += [f"### {entry.title}", ""]
            if entry.note:
                parts += [f"*Set-up:* {entry.note}.", ""]
            if comp is None:
                parts += ["*Not run yet.*", ""]
                continue
            png = results / name / f"{entry.id}.curves.png"
            parts += [format_table(comp), "", f"![{entry.id}]({rel(png)})", ""]
            parts.append(
                f"({len(comp.runs) + len(comp.tuning)} runs, {comp.seconds / 60:.0f} min with the suite's workers)"
            )
            parts.append("")
            if name == "demo":
                link = Path(os.path.relpath(png, readme.parent)).as_posix()
                demo = f"{format_table(comp)}\n\n![make demo]({link})"
            else:
                summary += [f"- **{entry.id}**: {line}" for line in verdict_lines(comp)]
                tally_verdicts(comp, tally)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts).rstrip("\n") + "\n")
    written = [doc]
    if readme.exists():
        body = (
            tally_table(tally) + "\n\n" + "\n".join(summary)
            if summary
            else "*No suite has been run yet (`make results`).*"
        )
        text = replace_block(readme.read_text(), "suites", body)
        if "<!-- results:demo -->" in text:
            text = replace_block(text, "demo", demo)
        readme.write_text(text)
        written.append(readme)
    for page in sorted(doc.parent.rglob("*.md")):  # a docs page may hold one suite's verdicts
        text = page.read_text()
        blocks = [name for name in found if f"<!-- results:suite:{name} -->" in text]
        for name in blocks:
            text = replace_block(text, f"suite:{name}", suite_summary(found[name]))
        if blocks:
            page.write_text(text)
            written.append(page)
    return written


def suite_summary(entries: list[tuple[SuiteEntry, Comparison | None]]) -> str:
    """The verdict lines of one suite's comparisons, grouped under each comparison's title."""
    from .report import verdict_lines

    parts = []
    for entry, comp in entries:
        parts.append(f"- **{entry.title}** (`{entry.id}`)" + (": *not run yet*" if comp is None else ""))
        if comp is not None:
            parts += [f"  - {line}" for line in verdict_lines(comp)]
    return "\n".join(parts)
