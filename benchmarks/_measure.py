"""Timing and memory measurement shared by the benchmarks.

* **Time**: :func:`interleaved` runs every configuration's step in turn, ``reps`` rounds of
  ``steps`` steps each, in a rotating order, so load on the shared machine hits all of them
  alike; it records the process's CPU time (``time.process_time``: time spent descheduled does
  not count; run with one thread) and the wall time per step. :func:`summary` gives the median
  and the spread (min–max of the per-round values); ratios are taken round by round, in the
  same round (:func:`ratio`), which cancels most of the machine's drift.
* **Peak memory**: :func:`peak_bytes` runs the configuration in a fresh process: it builds the
  model, optimizer and batch, runs warm-up steps, resets the kernel's peak-RSS counter (VmHWM,
  ``/proc/self/clear_refs``) and runs two steps; the peak is VmHWM minus the resident size before
  the build (taken after a first build and steps of the same configuration were run and freed, so
  code pages and lazy initialisation are not counted). glibc malloc runs with a fixed 64 KiB mmap threshold (``MALLOC_MMAP_THRESHOLD_``),
  so every tensor block of that size or more is its own mapping, returned to the kernel when
  freed: the resident size then follows the live tensor bytes (page-rounded) plus the
  interpreter's small objects. (``torch.profiler``'s memory total was tried and rejected: with
  torch 2.13 on CPU it misses frees of reused blocks and grows by a step's temporaries every
  step.) Linux only.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

__all__ = ["interleaved", "summary", "ratio", "peak_bytes", "fmt", "METASTE_PATH"]

#: the metaste that is benchmarked: this checkout's, or the one at $METASTE_PATH (e.g. another
#: worktree, for before/after numbers); the benchmark scripts put it first on sys.path
METASTE_PATH = os.environ.get("METASTE_PATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if METASTE_PATH not in sys.path:
    sys.path.insert(0, METASTE_PATH)


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, steps: int, warmup: int = 5
) -> dict[str, dict[str, list]]:
    """{name: {"cpu": [s/step per round], "wall": [...]}}; ``warmup`` untimed calls of each first:
    the first calls compile the fused passes (FOGZO's on its first step, the quantizers' on the
    first backward, HyperSTE analytical's history pass on its third step)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    out = {n: {"cpu": [], "wall": []} for n in fns}
    names = list(fns)
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f = fns[n]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                f()
            out[n]["cpu"].append((time.process_time() - c0) / steps)
            out[n]["wall"].append((time.perf_counter() - w0) / steps)
    return out


def summary(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios a/b."""
    return summary([x / y for x, y in zip(a, b)])


def fmt(s: tuple[float, float, float], scale: float = 1.0, digits: int = 2) -> str:
    """'median (min–max)'."""
    m, lo, hi = (x * scale for x in s)
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def peak_bytes(module: str, builder: str, warmup: int = 2, measured: int = 2, **kwargs: object) -> int:
    """Peak resident bytes over ``measured`` consecutive steps of ``module.builder(**kwargs)`` (a
    zero-arg step function), above what the process held before building it; measured in a fresh
    process (see the module docstring). Two steps by default: HyperSTE delayed (window 2) records
    an update on one step and consumes it on the next, and the two peak differently."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    code = _CHILD.format(
        here=here, module=module, builder=builder, kwargs=json.dumps(kwargs), warmup=warmup, measured=measured
    )
    env["METASTE_PATH"] = METASTE_PATH
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {module}.{builder}({kwargs}) failed:\n{out.stderr}")
    return int(out.stdout.strip().splitlines()[-1])


MMAP_THRESHOLD = 65536  # bytes: every tensor block at least this large is its own mmap

_CHILD = """
import json, sys
sys.path.insert(0, {here!r})
import _measure
import torch
torch.set_num_threads(1)
import gc
import {module} as m
from _measure import _status_kib, _reset_peak
kwargs = json.loads({kwargs!r})
step = m.{builder}(**kwargs)  # a first build and steps: code pages, lazy initialisation
for _ in range({warmup} + 1):
    step()
del step
gc.collect()
base = _status_kib("VmRSS")
step = m.{builder}(**kwargs)
for _ in range({warmup}):
    step()
_reset_peak()
for _ in range({measured}):
    step()
print((_status_kib("VmHWM") - base) * 1024)
"""


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
