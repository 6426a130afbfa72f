"""Base-optimizer configurations from PyTorch's own optimizer database (``optim_db``, needs
``expecttest``): the wrappers switched off must be bit-identical to these (docs/design.md §5)."""

from __future__ import annotations

import pytest
import torch


def optim_db_cases(classes: tuple[type[torch.optim.Optimizer], ...]) -> list:
    """``pytest.param(cls, kwargs)`` for every CPU configuration of ``classes`` in optim_db,
    each with foreach off and on; fused/capturable/differentiable configurations are skipped."""
    from torch.testing._internal.common_optimizers import optim_db

    cases = []
    for info in optim_db:
        if info.optim_cls not in classes:
            continue
        for oi in info.optim_inputs_func(device="cpu"):
            if any(k in oi.kwargs for k in ("fused", "capturable", "differentiable")):
                continue
            for foreach in (False, True):
                cases.append(
                    pytest.param(
                        info.optim_cls,
                        {**oi.kwargs, "foreach": foreach},
                        id=f"{info.optim_cls.__name__}-{oi.desc}-foreach{foreach}",
                    )
                )
    return cases
