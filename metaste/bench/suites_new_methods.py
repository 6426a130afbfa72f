"""The ``new-methods`` suite: PEGE, JacQuant and the calibrated surrogate against the STE family
on the MNIST MLP, with the ablations and confirmations that locate PEGE's gain."""

from __future__ import annotations

from .suite_entry import SuiteEntry, mnist

__all__ = ["NEW_METHODS"]

_NEW_METHODS = ["ste", "ste-identity", "calibrated", "pege"]
_NEW_TUNE = {"lam": [0.01, 0.1], "lam_init": [0.0, 1.0]}

NEW_METHODS: list[SuiteEntry] = (
    [
        SuiteEntry(
            "new-methods-mnist-2bit",
            "FOGZO paper's MNIST MLP 784-10-10, both layers 2-bit, fixed LSQ-init step, SGD, 3,000 steps: "
            "calibrated surrogate and PEGE (docs/methods/calibrated.md, docs/methods/pege.md)",
            *mnist(
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
            *mnist(*args, _NEW_METHODS, 10, tune=_NEW_TUNE, **kw),
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
            *mnist(*args, ["ste-identity", method], 20, first_seed=10, tune=tune),
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
            *mnist(
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
            *mnist(
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
            "new-methods-mnist-1bit-arms-confirm",
            "MNIST MLP 784-10-10, first layer 1-bit DoReFa (head float), SGD, 1,500 steps: PEGE and its "
            "curriculum alone against the STE family with a longer float phase, on 20 fresh seeds",
            *mnist(
                1,
                "dorefa",
                "sgd",
                ["ste", "ste-identity", "ste-float", "pege", "pege[lam=0,delta=0]"],
                20,
                first_seed=60,
                tune={"float_frac": [0.25, 0.5, 0.75]},
            ),
            "a confirmation of `new-methods-mnist-1bit-arms` (seeds 40–59), where the tuned float fraction "
            "sat at the edge of its grid (0.25): here it is tuned over 0.25, 0.5, 0.75; evaluation seeds 60–79",
        )
    ]
    + [
        SuiteEntry(
            f"jacquant-{name}",
            f"MNIST MLP 784-10-10, {title}: JacQuant without and with STORM",
            *mnist(*args, ["ste", "ste-identity", "jacquant", "jacquant-storm"], 10, **kw),
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
    ]
)
