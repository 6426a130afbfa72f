"""What a suite entry is, and the lr grids and the MNIST set-up helper the suites share."""

from __future__ import annotations

from dataclasses import dataclass

from .compare import Protocol, Setup

__all__ = ["SuiteEntry", "LR_SGD", "LR_ADAM", "mnist"]

LR_SGD = [0.025, 0.05, 0.1, 0.2]
LR_ADAM = [0.0025, 0.005, 0.01, 0.02]


@dataclass(frozen=True)
class SuiteEntry:
    id: str
    title: str
    setup: Setup
    protocol: Protocol
    note: str = ""  # where the suite departs from the source (seeds, steps) and why, or what it confirms


# the FOGZO paper's MNIST set-up: both layers 2-bit with a fixed step set once from the LSQ init formula
FIXED_LSQ_INIT = {"fixed_init": "lsq", "keep_last": False}


def mnist(
    bits: int, quantizer: str, optimizer: str, methods: list[str], seeds: int, first_seed: int = 0, **kw
) -> tuple:
    setup = Setup(
        "mnist-mlp",
        bits=bits,
        quantizer=quantizer,
        optimizer=optimizer,
        quant=dict(FIXED_LSQ_INIT) if quantizer == "fixed" else {},
        steps=kw.pop("steps", None),
    )
    lrs = LR_SGD if optimizer == "sgd" else LR_ADAM
    seeds_ = list(range(first_seed, first_seed + seeds))
    return setup, Protocol(methods=methods, seeds=seeds_, tune_lr=lrs, **kw)
