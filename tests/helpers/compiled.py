"""What the tests of metaste's compiled passes share: one pass, or a whole training run, with a
module's passes eager and then compiled (its ``FUSE_MIN`` set so that no tensor, then every
tensor, is large enough)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from metaste import _compile

LIMITS = (1 << 40, 1)  # FUSE_MIN: eager, then compiled


def eager_and_compiled(module: ModuleType, fn: Callable, *args) -> list[tuple]:
    """``fn(*copies)`` on fresh copies of the tensor arguments, eager then compiled: two
    (output, copies) pairs (the copies hold what ``fn`` wrote in place)."""
    outs = []
    for limit in LIMITS:
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "FUSE_MIN", limit)
            outs.append((fn(*copies), copies))
    assert not _compile._BROKEN, _compile._BROKEN
    return outs


def eager_and_compiled_runs(
    module: ModuleType,
    base: torch.nn.Module,
    make_opt: Callable,
    steps: int,
    state: Callable,
    d_in: int,
    classes: int = 5,
) -> list:
    """Train copies of ``base`` for ``steps`` steps on one fixed batch with ``make_opt(model)``,
    eager then compiled; returns ``state(model, opt)`` of each run."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, d_in, generator=g), torch.randint(0, classes, (16,), generator=g)
    runs = []
    for limit in LIMITS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "FUSE_MIN", limit)
            model = copy.deepcopy(base)
            opt = make_opt(model)
            for _ in range(steps):
                opt.step(lambda m=model: F.cross_entropy(m(x), y))
            runs.append(state(model, opt))
    assert not _compile._BROKEN, _compile._BROKEN
    return runs
