"""Where users train (docs/design.md §10): each submodule adapts one framework and imports it, so
import the one you use; the core package never imports them.

* :mod:`metaste.integrations.transformers` — ``MetasteTrainer`` (HF ``Trainer``), extra ``[hf]``.
* :mod:`metaste.integrations.lightning` — ``MetasteModule`` mixin (manual optimisation), ``[lightning]``.
* :mod:`metaste.integrations.accelerate` — ``prepare(accelerator, ...)``, extra ``[hf]``.

fp16 loss scaling, clipping and accumulation live in the wrappers themselves
(:mod:`metaste.optim.core.amp`); the integrations hand them the framework's scaler, clip value and
micro-batches.
"""

from __future__ import annotations

import importlib

__all__ = ["require"]


def require(module: str, extra: str, what: str):
    """Import ``module`` or raise an ``ImportError`` naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the '{module}' package: pip install 'metaste[{extra}]' (after torch==2.13.0)"
        ) from err
