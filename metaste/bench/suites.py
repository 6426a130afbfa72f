"""The comparison suites (``metaste compare --suite NAME``): each a list of comparisons with
their titles and notes, and :func:`run_suite`, which saves one JSON, table and PNG per
comparison under ``OUT/NAME/``. :mod:`metaste.bench.pages` turns the saved files into the
results pages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .compare import Protocol, Setup, compare
from .report import write_outputs
from .suite_entry import FIXED_LSQ_INIT, LR_SGD, SuiteEntry, mnist
from .suites_new_methods import NEW_METHODS

__all__ = ["SuiteEntry", "SUITES", "run_suite"]

# The FOGZO paper's MNIST experiment: MLP 784-10-10, both layers 2-bit with a fixed step set once
# from the LSQ init formula, SGD, batch 64, 3,000 steps.
_FOGZO_METHODS = [
    "ste",
    "ste-identity",
    "fogzo",
    "fogzo[beta_min=0.999]",
    "fogzo-1sided",
    "fogzo[ste_fraction=0.7]",
    "nspsa",
]
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
            *mnist(2, "fixed", "sgd", _FOGZO_METHODS, 20, steps=3000),
        )
    ],
    "lsq-mnist": [
        SuiteEntry(
            f"lsq-mnist-2bit-{opt}",
            f"MNIST MLP 784-10-10, 2-bit LSQ (last layer float), {opt.upper()}, 1,500 steps",
            *mnist(2, "lsq", opt, ["ste", "ste-identity", "fogzo", f"delayed-{opt}"], 10),
        )
        for opt in ("sgd", "adam")
    ]
    + [
        SuiteEntry(
            "lsq-mnist-2bit-sgd-confirm",
            "MNIST MLP 784-10-10, 2-bit LSQ, SGD, 1,500 steps: `delayed-sgd` against the identity STE "
            "on 20 fresh seeds",
            *mnist(2, "lsq", "sgd", ["ste-identity", "delayed-sgd"], 20, first_seed=10),
            "a confirmation of the one `better` verdict of `lsq-mnist-2bit-sgd` (seeds 0–9), whose "
            "protocol it repeats (same tuning seeds and grid) on evaluation seeds 10–29",
        ),
        SuiteEntry(
            "lsq-mnist-2bit-sgd-float",
            "MNIST MLP 784-10-10, 2-bit LSQ (last layer float), SGD, 1,500 steps, from the float model",
            dataclasses.replace(mnist(2, "lsq", "sgd", [], 10)[0], init="float"),
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
            *mnist(bits, "dorefa" if bits == 1 else "fixed", "sgd", _HYPER_METHODS, 10),
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
                quant={**FIXED_LSQ_INIT, "granularity": "channel"},
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
            "re-estimated before every evaluation. CPU budget: 90 runs of 1–3 min, 1–1.5 hours on 2 cores; "
            "the accuracy still rises at 600 steps (see the training-length curve), so this compares methods "
            "at a fixed, not a converged, budget",
        ),
        SuiteEntry(
            "fashion-resnet-2bit-sgd-float",
            "Fashion-MNIST subset, ResNet-8-style, 2-bit LSQ, SGD, 300 steps, from the float model",
            Setup("fashion-resnet", bits=2, optimizer="sgd", steps=300, init="float"),
            Protocol(
                methods=["ste", "ste-identity", "pege", "parq"],
                seeds=list(range(10)),
                tune_seeds=[100, 101],
                tune_lr=[0.025, 0.05, 0.1],
                max_extend=1,
            ),
            "QAT from a float model: every method starts from the seed's float ResNet (600 SGD steps at lr "
            "0.05, cached), quantized, BatchNorm re-estimated; 300 fine-tuning steps, 10 evaluation seeds, 2 "
            "tuning seeds, 3-point lr grid (one extension). CPU budget: 12 float models (~1 min each) and "
            "~70 runs of ~35 s, about 30 min on 2 cores",
        ),
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
        ),
        SuiteEntry(
            "kjv-llama-4bit-float",
            "KJV characters, tiny LLaMA (1M), 4-bit LSQ, AdamW, 150 steps, from the float model",
            Setup("kjv-llama", bits=4, steps=150, init="float"),
            Protocol(
                methods=["ste", "ste-identity", "pege", "parq"],
                seeds=list(range(10)),
                tune_seeds=[100, 101],
                tune_lr=[2.5e-4, 5e-4, 1e-3],
                max_extend=1,
            ),
            "QAT from a float model: every method starts from the seed's float LLaMA (300 AdamW steps at lr 2e-3, "
            "cached), quantized; 150 fine-tuning steps on a lower lr grid than from scratch, 10 evaluation "
            "seeds, 2 tuning seeds (one extension). CPU budget: 12 float models (~90 s each) and ~70 runs of "
            "~45 s, about 30 min on 2 cores",
        ),
    ],
    "curriculum": [
        SuiteEntry(
            "curriculum-mnist-1bit",
            "MNIST MLP 784-10-10, first layer 1-bit DoReFa (head float), SGD, 1,500 steps: the quantization "
            "curricula against the STE family with a float phase",
            *mnist(
                1,
                "dorefa",
                "sgd",
                [
                    "ste",
                    "ste-identity",
                    "ste-float",
                    "ste+random[cur_schedule=log]",  # PEGE's curriculum alone, on the plain STE
                    "ste+nested[cur_schedule=log]",
                    "ste+blend",
                    "ste+switch",
                    "ste-identity+random[cur_schedule=log]",
                    "ste-identity+blend",
                ],
                10,
                first_seed=80,
                tune={"float_frac": [0.25, 0.5], "cur_length": [0.25, 0.5]},
            ),
            "fresh evaluation seeds 80–89; the float-phase fraction and the curriculum length T_c/T are tuned "
            "with the lr on the tuning seeds. CPU budget: ~300 runs of ~3 s, about 10 min on 2 cores",
        ),
        SuiteEntry(
            "curriculum-mnist-1bit-confirm",
            "MNIST MLP 784-10-10, first layer 1-bit DoReFa (head float), SGD, 1,500 steps: the random-mask "
            "curriculum on 20 fresh seeds, beside PEGE's own and the per-block (Quant-Noise) masks",
            *mnist(
                1,
                "dorefa",
                "sgd",
                [
                    "ste",
                    "ste-identity",
                    "ste-float",
                    "ste+random[cur_schedule=log]",
                    "ste+noise[cur_schedule=log]",
                    "pege[lam=0,delta=0]",
                ],
                20,
                first_seed=110,
                tune={"float_frac": [0.25, 0.5], "cur_length": [0.25, 0.5]},
            ),
            "a confirmation of `curriculum-mnist-1bit` (seeds 80–89) on evaluation seeds 110–129; "
            "`pege[lam=0,delta=0]` is PEGE's curriculum alone, with its per-forward masks",
        ),
        SuiteEntry(
            "curriculum-fashion-resnet-2bit-float",
            "Fashion-MNIST subset, ResNet-8-style, 2-bit LSQ, SGD, 300 steps, from the float model: gradual "
            "quantization of a trained float network",
            Setup("fashion-resnet", bits=2, optimizer="sgd", steps=300, init="float"),
            Protocol(
                methods=[
                    "ste",
                    "ste-identity",
                    "ste+random[cur_schedule=log,cur_length=0.5]",
                    "ste+nested[cur_schedule=log,cur_length=0.5]",
                    "ste-identity+blend[cur_length=0.5]",
                ],
                seeds=list(range(10)),
                tune_seeds=[100, 101],
                tune_lr=[0.025, 0.05, 0.1],
                max_extend=1,
            ),
            "the float models of `fashion-resnet-2bit-sgd-float` (cached); T_c = T/2 fixed (no length tuning, "
            "to fit the CPU). CPU budget: ~90 runs of ~35 s, about 25 min on 2 cores",
        ),
        SuiteEntry(
            "curriculum-kjv-llama-4bit-float",
            "KJV characters, tiny LLaMA (1M), 4-bit LSQ, AdamW, 150 steps, from the float model: gradual "
            "quantization of a trained float network",
            Setup("kjv-llama", bits=4, steps=150, init="float"),
            Protocol(
                methods=[
                    "ste",
                    "ste+random[cur_schedule=log,cur_length=0.5]",
                    "ste-identity+blend[cur_length=0.5]",
                ],
                seeds=list(range(10)),
                tune_seeds=[100, 101],
                tune_lr=[2.5e-4, 5e-4, 1e-3],
                max_extend=1,
            ),
            "the float models of `kjv-llama-4bit-float` (cached); T_c = T/2 fixed. CPU budget: ~55 runs of ~45 s, "
            "about 20 min on 2 cores",
        ),
    ],
    # benchmarks/gpu_check.sh runs this one on a lent GPU (not part of `make results`)
    "gpu": [
        SuiteEntry(
            f"{task}-gpu",
            f"{title} (GPU scale), {bits}-bit LSQ, {opt.upper()}, 1,000 steps, from scratch, on one GPU",
            Setup(task, bits=bits, optimizer=opt, steps=1000, scale="gpu", device="cuda"),
            Protocol(
                methods=["ste", "ste-identity", "ste-float", "fogzo", hyper, "pege", "parq"],
                seeds=[0, 1, 2],
                tune_seeds=[100],
            ),
            "3 evaluation seeds, 1 tuning seed that picks the best STE variant, every method at the task's "
            "lr (no lr grid): sized for ≤ 8 minutes on one H100 with 4 workers",
        )
        for task, title, bits, opt, hyper in [
            ("fashion-resnet", "Fashion-MNIST, ResNet-20", 2, "sgd", "delayed-sgd"),
            ("kjv-llama", "KJV characters, tiny LLaMA (10M)", 4, "adamw", "delayed-adam"),
        ]
    ],
    "new-methods": NEW_METHODS,
}


def run_suite(
    name: str,
    out: Path,
    workers: int = 1,
    only: list[str] | None = None,
    *,
    device: str | None = None,
    scale: str | None = None,
    steps: int | None = None,
    seeds: int | None = None,
) -> int:
    """Run the comparisons of suite ``name`` (those named in ``only``, default all); save
    ``OUT/NAME/<id>.comparison.json``, ``.table.md`` and ``.curves.png``. ``device``, ``scale``,
    ``steps`` and ``seeds`` (the first n evaluation seeds) override every entry's, e.g. to try the
    GPU suite on the CPU at a tiny size."""
    ids = [e.id for e in SUITES[name]]
    unknown = sorted(set(only or ()) - set(ids))
    if unknown:
        raise ValueError(f"suite {name!r} has no entry {unknown}; its entries are {', '.join(ids)}")
    for entry in SUITES[name]:
        if only and entry.id not in only:
            continue
        setup, protocol = entry.setup, entry.protocol
        if device is not None:
            setup = dataclasses.replace(setup, device=device)
        if scale is not None:
            setup = dataclasses.replace(setup, scale=scale)
        if steps is not None:
            setup = dataclasses.replace(setup, steps=steps)
        if seeds is not None:
            protocol = dataclasses.replace(protocol, seeds=protocol.seeds[:seeds])
        print(f"## {entry.id}: {entry.title}", flush=True)
        comp = compare(setup, protocol, workers=workers)
        write_outputs(comp, out / name, stem=f"{entry.id}.")
    return 0
