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

import dataclasses
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
        ),
        SuiteEntry(
            "lsq-mnist-2bit-sgd-float",
            "MNIST MLP 784-10-10, 2-bit LSQ (last layer float), SGD, 1,500 steps, from the float model",
            dataclasses.replace(_mnist(2, "lsq", "sgd", [], 10)[0], init="float"),
            Protocol(
                methods=[
                    "ste",
                    "ste-identity",
                    "ste-float",
                    "fogzo",
                    "delayed-sgd",
                    "pege",
                    "parq-hard",
                    "parq",
                ],
                seeds=list(range(10)),
                tune_lr=LR_SGD,
            ),
            "QAT the way practitioners run it: every method starts from the seed's float model (1,500 SGD "
            "steps at lr 0.1, cached), quantized with LSQ steps set from its weights",
        ),
    ],
    "hyperste": [
        SuiteEntry(
            f"hyperste-mnist-{bits}bit",
            "MNIST MLP 784-10-10, "
            + (
                "first layer 1-bit DoReFa (head float)"
                if bits == 1
                else "both layers 2-bit fixed LSQ-init step"
            )
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
            "fashion-resnet-2bit-sgd",
            "Fashion-MNIST subset, ResNet-8-style, 2-bit LSQ, SGD, 600 steps, from scratch",
            Setup("fashion-resnet", bits=2, optimizer="sgd", steps=600),
            Protocol(
                methods=["ste", "ste-identity", "ste-float", "pege", "parq"],
                seeds=list(range(10)),
                tune_seeds=[100, 101],
                tune_lr=[0.05, 0.1, 0.2],
                max_extend=1,
            ),
            "10 evaluation seeds, 2 tuning seeds, 600 steps, 3-point lr grid (one extension); BatchNorm "
            "re-estimated before every evaluation. CPU budget: ~100 runs of ~70 s, about 1 hour on 2 cores; "
            "the accuracy still rises at 600 steps (82 % → 85 % by 1,500 for the identity STE), so this "
            "compares methods at a fixed, not a converged, budget",
        )
    ],
    "kjv-llama": [
        SuiteEntry(
            "kjv-llama-4bit",
            "KJV characters, tiny LLaMA (1M), 4-bit LSQ, AdamW, 150 steps, from scratch",
            Setup("kjv-llama", bits=4, steps=150),
            Protocol(
                methods=["ste", "ste-identity", "ste-float", "parq"],
                seeds=list(range(10)),
                tune_seeds=[100, 101],
                tune_lr=[1e-3, 2e-3, 4e-3],
                max_extend=1,
            ),
            "10 evaluation seeds, 2 tuning seeds, 150 steps, 3-point lr grid (one extension), AdamW only. "
            "CPU budget: ~70 runs of ~45 s, about 30 min on 2 cores",
        )
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
                "first layer 1-bit DoReFa (head float), SGD, 1,500 steps",
                (1, "dorefa", "sgd"),
                {},
                "the set-up of `hyperste-mnist-1bit`; JacQuant is not in it: its slope is fitted to "
                "round-to-nearest codes (fixed or LSQ quantizers), which a 1-bit sign quantizer has not",
            ),
            (
                "mnist-1bit-adam",
                "first layer 1-bit DoReFa (head float), Adam, 1,500 steps",
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
                "first layer 1-bit DoReFa (head float), SGD, 1,500 steps",
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
            "MNIST MLP 784-10-10, first layer 1-bit DoReFa (head float), SGD, 1,500 steps: which part of PEGE gains",
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
            "new-methods-mnist-1bit-arms",
            "MNIST MLP 784-10-10, first layer 1-bit DoReFa (head float), SGD, 1,500 steps: where PEGE's gain "
            "comes from, against the STE family with a float phase and PARQ",
            *_mnist(
                1,
                "dorefa",
                "sgd",
                [
                    "ste",
                    "ste-identity",
                    "ste-float",  # float phase, then a hard switch to the clipped STE
                    "ste-identity-float",
                    "pege",  # curriculum + EWGS term + penalty, clipped ψ
                    "pege-identity",  # the same with the identity STE as ψ
                    "pege[lam=0,delta=0]",  # the curriculum alone, clipped STE
                    "pege-identity[lam=0,delta=0]",  # the curriculum alone, identity STE
                    "parq-hard",
                    "parq",
                    "parq-binaryrelax",
                ],
                20,
                first_seed=40,
                tune={"float_frac": [0.1, 0.25]},
            ),
            "fresh evaluation seeds 40–59; the float-phase fraction is tuned (0.1, 0.25) with the lr; PEGE's "
            "λ = 0.01 (its default, the tuned value of `new-methods-mnist-1bit`)",
        )
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
    """Rewrite ``doc`` (the one-screen answer, the verdict tally and lines, every suite's tables
    and plots) and the ``results:answer`` / ``results:demo`` blocks of ``readme`` from the saved
    JSON."""
    from .answer import answer_rows, answer_table
    from .report import format_table, verdict_lines

    found = _load(results)
    rel = lambda p: Path(p).relative_to(doc.parent).as_posix()  # noqa: E731
    summary: list[str] = []
    tally: dict[str, dict[str, list[str]]] = {}
    rows: list[dict] = []
    body: list[str] = []
    demo = "*Not run yet (`make results`).*"
    for name, entries in found.items():
        body += [f"## Suite `{name}`", "", f"`metaste compare --suite {name}`", ""]
        for entry, comp in entries:
            body += [f"### {entry.title}", ""]
            if entry.note:
                body += [f"*Set-up:* {entry.note}.", ""]
            if comp is None:
                body += ["*Not run yet.*", ""]
                continue
            png = results / name / f"{entry.id}.curves.png"
            body += [format_table(comp), "", f"![{entry.id}]({rel(png)})", ""]
            body.append(
                f"({len(comp.runs) + len(comp.tuning)} runs, {comp.seconds / 60:.0f} min with the suite's workers)"
            )
            body.append("")
            if name == "demo":
                link = Path(os.path.relpath(png, readme.parent)).as_posix()
                demo = f"{format_table(comp)}\n\n![make demo]({link})"
                continue
            summary += [f"- **{entry.id}**: {line}" for line in verdict_lines(comp)]
            tally_verdicts(comp, tally)
            row = answer_rows(entry.id, comp)
            if row is not None:
                rows.append(row)
    answer = answer_table(rows) if rows else "*No suite has been run yet (`make results`).*"
    parts = [
        "# Results: every method against the best tuned STE",
        "",
        "Regenerated by `make results` (runs the suites, then `metaste report`); do not edit by hand.",
        "",
        "## The answer",
        "",
        answer,
        "",
        ANSWER_LEGEND,
        "",
        "## Protocol",
        "",
        PROTOCOL,
        "",
        "## Every verdict",
        "",
        tally_table(tally) if tally else "",
        "",
        *summary,
        "",
        *body,
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts).rstrip("\n") + "\n")
    written = [doc]
    if readme.exists():
        text = readme.read_text()
        if "<!-- results:answer -->" in text:
            text = replace_block(text, "answer", answer + "\n\n" + ANSWER_LEGEND)
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


ANSWER_LEGEND = (
    "One row per comparison (set-up: task, bits, quantizer, optimizer, initialisation). *Best STE*: "
    "the best of the listed plain-STE family (clipped, identity, PWL, and each with a float phase "
    "before quantizing) at its tuned lr, chosen on the tuning seeds; its test metric (accuracy, or "
    "validation perplexity: lower is better) and its seed-to-seed SD. The metaste and PARQ cells give "
    "the best mean Δ among the listed methods of that kind (method − best STE, paired over the "
    "evaluation seeds, ± the 95 % CI half-width) and the verdict: `better`/`worse` only when the CI "
    "excludes 0. Picking the best of several methods favours noise: a lone `better` is a lead until "
    "a confirmation entry repeats it on fresh seeds. Every evaluation re-estimates BatchNorm on 20 "
    "fixed training batches with the quantized weights."
)

PROTOCOL = (
    "Each method's learning rate (and any `--tune` option) is tuned on seeds 100+, by the validation "
    "loss on a part of the training set held out for tuning; the baseline is the best of the listed "
    "plain-STE variants at its tuned setting; Δ = method − baseline, paired over the evaluation seeds, "
    "± the t-based 95 % CI, (seeds better / pairs). *Equal compute*: the baseline's own run read off "
    "at the step count that costs the same forward-pass equivalents as the method's run. Each verdict "
    "is one 95 % test; over the dozens of verdicts on this page a few `better` or `worse` are expected "
    "by chance alone. A model with BatchNorm is evaluated (and validated, when tuning) after "
    "re-estimating its statistics on 20 fixed training batches with the weights being evaluated — "
    "the quantized ones (PARQ's rounded to its grid) — and the training statistics are put back "
    "afterwards. `from float` set-ups start every method from the seed's float model trained with the "
    "task's optimizer for the task's default steps (cached on disk), quantized, BatchNorm re-estimated."
)


def suite_summary(entries: list[tuple[SuiteEntry, Comparison | None]]) -> str:
    """The verdict lines of one suite's comparisons, grouped under each comparison's title."""
    from .report import verdict_lines

    parts = []
    for entry, comp in entries:
        parts.append(f"- **{entry.title}** (`{entry.id}`)" + (": *not run yet*" if comp is None else ""))
        if comp is not None:
            parts += [f"  - {line}" for line in verdict_lines(comp)]
    return "\n".join(parts)
