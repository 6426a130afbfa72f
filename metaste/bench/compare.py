"""The comparison protocol of ``metaste compare``: every method against the best tuned STE.

1. **Tuning, on separate seeds.** Each listed method (the STE baselines included) runs every
   setting of its grid — learning rates × the ``tune`` options it reads — on the tuning seeds,
   trained without the validation part of the training set; the setting with the lowest mean
   validation loss at the end of training wins. A winning learning rate at the edge of its grid
   is not tuned: the grid is extended by a factor 2 in that direction (up to ``max_extend``
   times) until the best lies inside, and the extension is recorded (:mod:`metaste.bench.tuning`).
2. **The baseline** is the best of the listed plain-STE variants (``ste``, ``ste-identity``,
   ``ste-pwl``) at their tuned learning rates, chosen on the tuning seeds by the same rule.
3. **Evaluation seeds** (disjoint from the tuning seeds) run every method at its tuned setting on
   the whole training set. The baseline runs long enough to match the compute of the most
   expensive method: since no task has a learning-rate schedule, its state after k steps of the
   long run *is* a k-step run, so its train loss and test metric at the compute-equivalent step
   count (``steps · fwd_equiv(method) / fwd_equiv(baseline)``) are read off that one run.

The verdicts (paired Δ with a t-based 95 % CI) are computed by :mod:`metaste.bench.report`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..quant.config import QuantConfig
from ..quant.convert import quantize_model
from ..quant.quantizers import check_bits
from .registry import METHODS, STE_BASELINES, RunContext, check_options, parse_method
from .runner import RunResult, RunSpec, eval_marks, loss_at, run_all, worker_pool
from .tasks import get_task
from .tuning import tune

__all__ = ["Setup", "Protocol", "Comparison", "check", "compare", "QUANT_KEYS", "INITS"]

# quantize_model settings a comparison may override (bits and the quantizer have their own flags)
QUANT_KEYS = tuple(f.name for f in dataclasses.fields(QuantConfig) if f.name not in ("bits", "quantizer")) + (
    "keep_last",
    "keep_fp",
)
DEFAULT_TUNE_SEEDS = (100, 101, 102)
INITS = ("scratch", "float")


@dataclass
class Setup:
    """What every method of a comparison shares: the task and its quantization."""

    task: str = "mnist-mlp"
    bits: int | None = None  # default: the task's
    quantizer: str | None = None  # default: the task's (1 bit: dorefa)
    optimizer: str | None = None  # base optimizer; default: the task's
    steps: int | None = None  # default: the task's
    lr: float | None = None  # learning rate of untuned methods; default: the task's
    quant: dict = field(default_factory=dict)  # more quantize_model settings
    method_opts: dict = field(default_factory=dict)  # given to every method that reads the key
    scale: str = "cpu"
    device: str = "cpu"
    init: str = "scratch"  # or "float": every method starts from the seed's trained float model

    def resolved(self) -> Setup:
        """A copy with the task's defaults filled in."""
        t = get_task(self.task, self.scale)
        return Setup(
            self.task,
            self.bits if self.bits is not None else t.bits,
            self.quantizer or ("dorefa" if (self.bits or t.bits) == 1 else t.quantizer),
            self.optimizer or t.optimizer,
            self.steps if self.steps is not None else t.steps,
            self.lr if self.lr is not None else t.lr,
            dict(self.quant),
            dict(self.method_opts),
            self.scale,
            self.device,
            self.init,
        )


@dataclass
class Protocol:
    """Which methods, which seeds, and how much tuning each gets."""

    methods: list[str]
    seeds: list[int]
    tune_seeds: list[int] = field(default_factory=lambda: list(DEFAULT_TUNE_SEEDS))
    tune_lr: list[float] | None = None  # None: every method at the setup's lr
    tune: dict[str, list] = field(default_factory=dict)  # option grids, e.g. {"beta_min": [...]}
    baseline: str = "best"  # "best" or one listed method
    equal_compute: bool = True
    max_extend: int = 3


@dataclass
class Comparison:
    """Everything a comparison measured (what :mod:`metaste.bench.report` turns into tables)."""

    setup: dict
    protocol: dict
    metric: str
    baseline: str | None
    choices: dict[str, dict]  # label → lr, options, val_loss, settings, notes
    tuning: list[dict]  # one record per tuning run
    runs: list[dict]  # one record per evaluation run (compact: no full loss curve)
    compute_steps: dict[str, int]  # label → baseline steps of equal compute
    notes: list[str]
    seconds: float
    hardware: str = ""  # the device the runs used, by name (the GPU's model on CUDA)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Comparison:
        return cls(**json.loads(Path(path).read_text()))


def _json_default(x):
    if isinstance(x, float | np.floating):
        return float(x)
    raise TypeError(f"not JSON serialisable: {x!r}")


def _method_opts(name: str, setup: Setup, fixed: dict) -> dict:
    reads = METHODS[name].options
    return {**{k: v for k, v in setup.method_opts.items() if k in reads}, **fixed}


def check(setup: Setup, protocol: Protocol) -> list[tuple[str, str, dict]]:
    """Validate a comparison before anything runs; returns (label, method, fixed options) per
    listed method. Every problem raises ``ValueError`` naming the valid choices."""
    get_task(setup.task, setup.scale)  # unknown task / scale
    if setup.init not in INITS:
        raise ValueError(f"unknown init {setup.init!r}; valid choices are {', '.join(INITS)}")
    if not protocol.methods:
        raise ValueError("no methods given")
    parsed = [(spec.strip(), *parse_method(spec)) for spec in protocol.methods]
    for _, name, _ in parsed:
        try:
            METHODS[name].available()
        except ImportError as e:
            raise ValueError(f"method {name!r}: {e}") from e
    labels = [p[0] for p in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is listed twice: {labels}")
    if setup.steps is not None and setup.steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {setup.steps}")
    if setup.lr is not None and not setup.lr > 0:
        raise ValueError(f"lr must be > 0, got {setup.lr}")
    if not protocol.seeds:
        raise ValueError("no evaluation seeds")
    overlap = sorted(set(protocol.seeds) & set(protocol.tune_seeds))
    if overlap:
        raise ValueError(
            f"tuning seeds {sorted(protocol.tune_seeds)} overlap the evaluation seeds at {overlap}; "
            "tune on seeds that are never evaluated (e.g. --tune-seeds 100,101,102)"
        )
    if protocol.tune_lr is not None:
        if not protocol.tune_lr:
            raise ValueError("--tune-lr is empty; give learning rates, e.g. 0.025,0.05,0.1,0.2")
        bad = [x for x in protocol.tune_lr if not (math.isfinite(x) and x > 0)]
        if bad:
            raise ValueError(f"learning rates must be finite and > 0, got {bad}")
    if (protocol.tune_lr is not None or protocol.tune) and not protocol.tune_seeds:
        raise ValueError("tuning needs tuning seeds (--tune-seeds)")
    bad_quant = sorted(set(setup.quant) - set(QUANT_KEYS))
    if bad_quant:
        hint = " (use --bits / --quantizer)" if {"bits", "quantizer"} & set(bad_quant) else ""
        raise ValueError(
            f"unknown quantization setting(s) {bad_quant}{hint}; valid keys are {', '.join(QUANT_KEYS)}"
        )
    names = {p[1] for p in parsed}
    for what, keys in (("--method-opt", setup.method_opts), ("--tune", protocol.tune)):
        read = {k for n in names for k in METHODS[n].options}
        unused = sorted(set(keys) - read)
        if unused:
            raise ValueError(
                f"{what} key(s) {unused} are read by none of the listed methods; "
                f"they read {', '.join(sorted(read)) or 'no options'}"
            )
    for key, grid in protocol.tune.items():
        if not grid:
            raise ValueError(f"--tune {key}= has no values")
    for _, name, fixed in parsed:
        check_options(name, _method_opts(name, setup, fixed))
    if protocol.baseline != "best" and protocol.baseline not in labels:
        raise ValueError(f"baseline {protocol.baseline!r} is not among the listed methods {labels}")
    _check_device(setup.device)
    if setup.bits is not None:
        check_bits(setup.bits)
    for label, name, fixed in parsed:
        _, grid = _candidates(name, fixed, setup.resolved(), protocol)
        for opts in grid:
            _try_build(setup.resolved(), label, name, opts)
    return parsed


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device (torch {torch.__version__})")


def _try_build(setup: Setup, label: str, name: str, opts: dict) -> None:
    """Build the method's optimizer on a small stand-in model, so that a bad option value (``n=0``,
    a negative ``float_frac``) is refused before any run."""
    import torch
    from torch import nn

    method = METHODS[name]
    model: nn.Module = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qkw = {"bits": setup.bits, "quantizer": setup.quantizer, **setup.quant}
    ctx = RunContext(setup.optimizer, setup.lr, setup.steps, 0, extra=dict(opts), quant=qkw)
    try:
        if method.quant is not None:
            qkw.update(method.quant)
            if method.substrate:
                model = quantize_model(model, inplace=True, **qkw)
        if not 0 <= float(opts.get("float_frac", 0.0)) <= 1:
            raise ValueError(f"float_frac must lie in [0, 1], got {opts['float_frac']}")
        with torch.random.fork_rng():
            method.build(model, ctx)
    except (ValueError, TypeError) as e:
        raise ValueError(f"method {label!r} with options {opts}: {e}") from e


def _candidates(name: str, fixed: dict, setup: Setup, protocol: Protocol) -> tuple[list[float], list[dict]]:
    lrs = list(protocol.tune_lr) if protocol.tune_lr is not None else [setup.lr]
    base = _method_opts(name, setup, fixed)
    keys = [k for k in protocol.tune if k in METHODS[name].options and k not in fixed]
    grids = [protocol.tune[k] for k in keys]
    opts = [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*grids)]
    return lrs, opts


def _spec(setup: Setup, label: str, name: str, lr: float, opts: dict, seed: int, **kw) -> RunSpec:
    return RunSpec(
        task=setup.task,
        method=name,
        label=label,
        seed=seed,
        lr=lr,
        steps=kw.pop("steps", setup.steps),
        bits=setup.bits,
        quantizer=setup.quantizer,
        options=tuple(sorted(opts.items())),
        quant=tuple(sorted(setup.quant.items())),
        optimizer=setup.optimizer,
        scale=setup.scale,
        device=setup.device,
        init=setup.init,
        schedule_steps=setup.steps,
        **kw,
    )


def _fwd_equiv(name: str, setup: Setup, lr: float, opts: dict) -> float:
    ctx = RunContext(setup.optimizer, lr, setup.steps, 0, extra=dict(opts))
    return METHODS[name].fwd_equiv(ctx)


def compare(
    setup: Setup,
    protocol: Protocol,
    *,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Tune, pick the baseline, evaluate; see the module docstring. The phases share one pool of
    ``workers`` processes."""
    t_start = time.perf_counter()
    parsed = check(setup, protocol)
    setup = setup.resolved()
    say = log or print
    grids = {label: (name, *_candidates(name, fixed, setup, protocol)) for label, name, fixed in parsed}
    ste_listed = [label for label, name, fixed in parsed if name in STE_BASELINES and not fixed]
    pick_best = protocol.baseline == "best" and len(ste_listed) > 1
    with worker_pool(workers) as pool:

        def run(specs: list[RunSpec]) -> list[RunResult]:
            return run_all(specs, pool, log)

        tuned = [
            lab
            for lab, (_, lrs, opts) in grids.items()
            if len(lrs) * len(opts) > 1 or (pick_best and lab in ste_listed)
        ]
        spec = functools.partial(_spec, setup)
        result = tune(grids, tuned, protocol.tune_seeds, protocol.max_extend, spec, run, say)
        choices, notes = result.choices, result.notes
        baseline = _pick_baseline(protocol, ste_listed, pick_best, choices)
        if baseline is not None:
            c = choices[baseline]
            how = f"best of {', '.join(ste_listed)} on the tuning seeds" if pick_best else "as listed"
            notes.append(f"baseline: {baseline} at lr {c['lr']:g} ({how})")
            say(f"# {notes[-1]}")
        compute_steps = _compute_steps(setup, protocol, grids, choices, baseline)
        specs = _evaluation_specs(setup, protocol, grids, choices, baseline, compute_steps)
        say(f"# evaluation: {len(specs)} runs on seeds {protocol.seeds}")
        results = run(specs)
    needed = {setup.steps, *compute_steps.values()}
    return Comparison(
        setup=asdict(setup),
        protocol=asdict(protocol),
        metric=get_task(setup.task, setup.scale).metric,
        baseline=baseline,
        choices=choices,
        tuning=result.records,
        runs=[_compact(r, needed) for r in results],
        compute_steps=compute_steps,
        notes=notes,
        seconds=time.perf_counter() - t_start,
        hardware=_hardware(setup.device),
    )


def _pick_baseline(protocol: Protocol, ste_listed: list[str], pick_best: bool, choices: dict) -> str | None:
    """The listed baseline, or the plain-STE variant with the lowest tuning validation loss."""
    if protocol.baseline != "best":
        return protocol.baseline
    if not ste_listed:
        return None
    return min(ste_listed, key=lambda lab: choices[lab]["val_loss"]) if pick_best else ste_listed[0]


def _compute_steps(
    setup: Setup, protocol: Protocol, grids: dict, choices: dict, baseline: str | None
) -> dict[str, int]:
    """label → the baseline's step count of equal compute (empty without equal compute)."""
    if baseline is None or not protocol.equal_compute:
        return {}
    fwd = {label: _fwd_equiv(grids[label][0], setup, c["lr"], c["options"]) for label, c in choices.items()}
    return {label: max(1, int(round(setup.steps * fwd[label] / fwd[baseline]))) for label in choices}


def _evaluation_specs(
    setup: Setup, protocol: Protocol, grids: dict, choices: dict, baseline: str | None, compute_steps: dict
) -> list[RunSpec]:
    """Every method at its tuned setting on every evaluation seed; the baseline runs to the longest
    equal-compute step count and records the metric at each of them."""
    task_marks = eval_marks(get_task(setup.task, setup.scale), setup.steps)
    specs = []
    for seed in protocol.seeds:
        for label, c in choices.items():
            kw: dict = {}
            if label == baseline and compute_steps:
                marks = task_marks | set(compute_steps.values())
                kw = dict(steps=max(compute_steps.values()), marks=tuple(sorted(marks)))
            specs.append(_spec(setup, label, grids[label][0], c["lr"], c["options"], seed, **kw))
    return specs


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}), one torch thread per worker"


def _compact(r: RunResult, steps: set[int], points: int = 200) -> dict:
    """A run's record without the full loss curve: the train loss at the steps the report needs
    and the curve averaged over ≤ ``points`` blocks (for the plots)."""
    n = len(r.losses)
    block = max(1, math.ceil(n / points))
    curve = [float(np.mean(r.losses[i : i + block])) for i in range(0, n, block)]
    return dict(
        label=r.label,
        method=r.method,
        seed=r.seed,
        lr=r.lr,
        bits=r.bits,
        options=r.options,
        diverged=r.diverged,
        steps=n,
        loss_at={str(k): loss_at(r.losses, k) for k in sorted(steps)},
        eval_steps=r.eval_steps,
        eval_values=r.eval_values,
        final_metric=r.final_metric,
        sec_per_step=r.sec_per_step,
        fwd_equiv=r.fwd_equiv,
        curve_steps=[min(n, i + block) for i in range(0, n, block)],
        curve=curve,
    )
