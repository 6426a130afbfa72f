"""One training run (:func:`run_one`) and many of them in worker processes (:func:`run_all`,
on a :func:`worker_pool` that a comparison keeps across its tuning and evaluation phases).

A :class:`RunSpec` names everything a run needs (task by name, method, seed, learning rate,
quantization), so it can be sent to a worker process. Every run uses one torch thread, in a
worker or in this process: two OpenMP threads per tiny op on a shared machine oversubscribe the
cores, and one thread everywhere makes the results identical for any number of workers.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..quant.convert import quantize_model
from .pretrain import load_float
from .registry import METHODS, RunContext, train_step
from .tasks import Task, get_task

__all__ = ["RunSpec", "RunResult", "run_one", "run_all", "worker_pool", "loss_at"]


@dataclass(frozen=True)
class RunSpec:
    """One run. ``holdout=True`` is a tuning run: it trains without the validation part of the
    training set, never looks at the test set, and reports ``val_loss``. ``marks`` are extra steps
    at which the test metric is recorded (the equal-compute read-offs). ``init="float"`` starts
    from the seed's trained float model (:mod:`metaste.bench.pretrain`), quantized and its
    BatchNorm re-estimated with the quantized weights. ``schedule_steps`` is the length every
    schedule of the method is set for (default ``steps``): a baseline run extended for the
    equal-compute read-offs keeps the schedules of a ``schedule_steps`` run."""

    task: str
    method: str
    label: str
    seed: int
    lr: float
    steps: int
    bits: int
    quantizer: str
    options: tuple[tuple[str, object], ...] = ()
    quant: tuple[tuple[str, object], ...] = ()
    optimizer: str | None = None
    scale: str = "cpu"
    device: str = "cpu"
    holdout: bool = False
    marks: tuple[int, ...] = ()
    init: str = "scratch"
    schedule_steps: int | None = None

    def build_task(self) -> Task:
        task = get_task(self.task, self.scale, self.device)
        changes: dict = {"lr": self.lr}
        if self.optimizer is not None:
            changes["optimizer"] = self.optimizer
        return dataclasses.replace(task, **changes)


@dataclass
class RunResult:
    label: str
    method: str
    seed: int
    lr: float
    bits: int | None
    phase: str  # "tune" (holdout, val_loss) or "eval" (test metric)
    losses: list[float]
    eval_steps: list[int]
    eval_values: list[float]
    final_metric: float
    val_loss: float
    sec_per_step: float
    fwd_equiv: float
    diverged: bool
    options: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10% of steps (smooths minibatch noise)."""
        return loss_at(self.losses, len(self.losses))

    def metric_at(self, step: int) -> float:
        """The test metric recorded at ``step`` (nan if the run diverged before it)."""
        for s, v in zip(self.eval_steps, self.eval_values):
            if s == step:
                return v
        return math.nan


def loss_at(losses: Sequence[float], step: int) -> float:
    """Mean training loss over the last 10% of the first ``step`` steps: the train loss a run of
    ``step`` steps reports (nan if the run stopped earlier)."""
    if step > len(losses) or step < 1:
        return math.nan
    return float(np.mean(losses[step - max(1, step // 10) : step]))


def run_one(spec: RunSpec) -> RunResult:
    """Train ``spec.task`` with one method and one seed (one torch thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(spec)
    finally:
        torch.set_num_threads(threads)


def _run(spec: RunSpec) -> RunResult:
    task = spec.build_task()
    method = METHODS[spec.method]
    model = task.model(spec.seed)
    if spec.init == "float":
        load_float(
            model, get_task(spec.task, spec.scale, spec.device), spec.scale, spec.seed, holdout=spec.holdout
        )
    qkw: dict = {}
    if method.quant is not None:
        quantizer = "dorefa" if spec.bits == 1 else spec.quantizer
        qkw = {**task.quant_kwargs, "bits": spec.bits, "quantizer": quantizer, **dict(spec.quant)}
        qkw.update(method.quant)
    extra = dict(spec.options)
    total = spec.schedule_steps or spec.steps
    ctx = RunContext(task.optimizer, task.lr, total, spec.seed, task.weight_decay, task.momentum, extra, qkw)
    float_steps = method.float_steps(ctx)
    quantize_now = method.quant is not None and method.substrate and float_steps == 0
    if quantize_now:
        model = quantize_model(model, inplace=True, **qkw)
    opt = method.build(model, ctx)
    cur = method.curriculum(model, ctx) if method.curriculum is not None else None
    if spec.init == "float" and method.quant is not None and float_steps == 0:
        with method.eval_view(model, opt), task.recalibrated(model, holdout=spec.holdout, keep=True):
            pass  # the float model's BatchNorm statistics re-estimated with the quantized weights
    model.train()
    marks = set() if spec.holdout else eval_marks(task, spec.steps) | set(spec.marks)
    losses: list[float] = []
    eval_steps: list[int] = []
    eval_values: list[float] = []
    elapsed = 0.0
    for step, batch in enumerate(task.batches(spec.seed, spec.steps, holdout=spec.holdout), start=1):
        t0 = time.perf_counter()
        loss = train_step(opt, lambda b=batch: task.loss(model, b))
        if cur is not None:
            cur.step()
        if step == float_steps and method.quant is not None:  # the float phase ends: quantize
            quantize_model(model, inplace=True, **qkw)  # in place: the closure's model is this one
            rest = dataclasses.replace(ctx, total_steps=total - float_steps)
            opt = method.build(model, rest)
        elapsed += time.perf_counter() - t0
        losses.append(loss)
        if not math.isfinite(loss):
            break
        if step in marks:
            eval_steps.append(step)
            eval_values.append(_evaluate(task, method, model, opt, qkw, step < float_steps))
    finished = len(losses) == spec.steps and math.isfinite(losses[-1])
    val_loss = math.nan
    if spec.holdout and finished:
        with method.eval_view(model, opt):
            val_loss = task.validation_loss(model)
    diverged = not finished or (spec.holdout and not math.isfinite(val_loss))
    final = eval_values[-1] if eval_steps and eval_steps[-1] == spec.steps and not diverged else math.nan
    return RunResult(
        spec.label,
        spec.method,
        spec.seed,
        spec.lr,
        None if method.quant is None else spec.bits,
        "tune" if spec.holdout else "eval",
        losses,
        eval_steps,
        eval_values,
        final,
        val_loss,
        elapsed / max(1, len(losses)),
        method.fwd_equiv(ctx),
        diverged,
        extra,
    )


def _evaluate(task: Task, method, model: nn.Module, opt, qkw: dict, in_float_phase: bool) -> float:
    """The test metric of the model's quantized weights (of a quantized copy during a float
    phase; the float reference's own weights)."""
    if in_float_phase and method.quant is not None:
        return task.evaluate(quantize_model(model, **qkw))
    with method.eval_view(model, opt):
        return task.evaluate(model)


def eval_marks(task: Task, steps: int) -> set[int]:
    """The steps at which a run of ``steps`` steps records the test metric."""
    return {int(round(steps * (k + 1) / task.eval_points)) for k in range(task.eval_points)}


def _init_worker(parent: int) -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker ends when the process that started it is gone (killed, not just exited): the
    pool's own shutdown never runs then, and the worker would train on for nobody."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _describe(spec: RunSpec, r: RunResult) -> str:
    what = f"val loss {r.val_loss:.4f}" if spec.holdout else f"metric {r.final_metric:.3f}"
    state = "DIVERGED" if r.diverged else f"loss {r.final_loss:.4f}, {what}"
    phase = "tune" if spec.holdout else "eval"
    return f"{phase} {spec.label} seed {spec.seed} lr {spec.lr:g} ({spec.steps} steps): {state}"


def cost(spec: RunSpec) -> float:
    """A run's expected cost in forward-equivalents (steps × the method's forwards per step): the
    order in which :func:`run_all` hands runs to the workers."""
    task = spec.build_task()
    ctx = RunContext(
        task.optimizer, spec.lr, spec.schedule_steps or spec.steps, spec.seed, extra=dict(spec.options)
    )
    return spec.steps * METHODS[spec.method].fwd_equiv(ctx)


@contextmanager
def worker_pool(n: int) -> Iterator[Executor | None]:
    """``n`` worker processes (spawned, one torch thread each) for :func:`run_all`, kept for the
    life of the block, so a comparison's phases share them: each worker starts, imports torch and
    loads its task's data once. ``None`` for ``n == 1`` (the runs stay in this process)."""
    if n < 1:
        raise ValueError(f"workers must be ≥ 1, got {n}")
    if n == 1:
        yield None
        return
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before they import torch
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
        ) as pool:
            yield pool
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def run_all(
    specs: Sequence[RunSpec],
    workers: int | Executor | None = 1,
    log: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Run every spec; results in the order of ``specs``. ``workers`` is a pool from
    :func:`worker_pool` or a number of worker processes to start for these runs (1 or ``None``: in
    this process). The costliest runs go first, so no worker is left with a long run at the end.
    ``log`` gets one line per finished run with the time left (estimated from the runs done)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if isinstance(workers, int) and workers > 1 and len(specs) > 1:
        with worker_pool(min(workers, len(specs))) as pool:
            return run_all(specs, pool, log)
    if isinstance(workers, int) and workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    results: list[RunResult | None] = [None] * len(specs)
    t0 = time.perf_counter()

    def done(i: int, r: RunResult) -> None:
        results[i] = r
        k = sum(x is not None for x in results)
        wall = time.perf_counter() - t0
        eta = wall / k * (len(specs) - k)
        log(f"[{k}/{len(specs)} {_clock(wall)} elapsed, ETA {_clock(eta)}] {_describe(specs[i], r)}")

    order = sorted(range(len(specs)), key=lambda i: -cost(specs[i]))
    if not isinstance(workers, Executor):
        for i in order:
            done(i, run_one(specs[i]))
    else:
        futures = {workers.submit(run_one, specs[i]): i for i in order}
        for fut in as_completed(futures):
            done(futures[fut], fut.result())
    return results  # type: ignore[return-value]


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"
