"""The optional extras, checked up front: a script that needs ``[plot]`` for its figures says so
before it trains, not after.

    metaste.extras.require("data", "plot")   # ImportError naming: pip install 'metaste[data,plot]'
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "require", "missing"]

#: extra → the modules it installs (what ``pip install 'metaste[extra]'`` brings)
EXTRAS: dict[str, tuple[str, ...]] = {
    "data": ("sklearn", "mlxtend", "mnist1d"),
    "plot": ("matplotlib", "tqdm"),
    "hf": ("transformers", "accelerate"),
    "lightning": ("lightning",),
    "torchao": ("torchao",),
    "brevitas": ("brevitas",),
}


def missing(*extras: str) -> list[str]:
    """The extras among ``extras`` with a module that is not installed."""
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise ValueError(f"unknown extra(s) {unknown}; metaste's extras are {', '.join(EXTRAS)}")
    return [e for e in extras if any(importlib.util.find_spec(m) is None for m in EXTRAS[e])]


def require(*extras: str) -> None:
    """Raise ``ImportError`` naming the install command if any of ``extras`` is missing."""
    gone = missing(*extras)
    if gone:
        mods = sorted({m for e in gone for m in EXTRAS[e] if importlib.util.find_spec(m) is None})
        raise ImportError(
            f"this needs metaste's extra(s) {', '.join(gone)} (missing: {', '.join(mods)}); install them "
            f"with: pip install 'metaste[{','.join(gone)}]' (after torch==2.13.0)"
        )
