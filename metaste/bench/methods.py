"""The methods of ``metaste compare`` (docs/design.md §11): the float reference and the plain-STE
family registered here, then the modules that register the rest — the metaste wrappers
(:mod:`.wrapper_methods`), torchao's PARQ (:mod:`.peers`) and the curricula
(:mod:`.curriculum_methods`, which extend the STE family and FOGZO)."""

from __future__ import annotations

from .registry import FLOAT_FRAC_DEFAULT, Method, base_optimizer, register_method

register_method(Method("fp32", "float model, base optimizer (the accuracy ceiling)", None, base_optimizer))
register_method(
    Method("ste", "quantized model, plain STE (clipped: zero gradient outside the grid)", {}, base_optimizer)
)
register_method(
    Method(
        "ste-identity",
        "quantized model, identity STE (no clip mask: every weight gets the full gradient)",
        {"surrogate": "identity"},
        base_optimizer,
    )
)
register_method(
    Method(
        "ste-pwl",
        "quantized model, fixed piecewise-linear STE (PLSTE at a = 1; the PLSTE/DLSTE baseline)",
        {"surrogate": "pwl"},
        base_optimizer,
    )
)
for _name, _what, _quant in (
    ("ste-float", "clipped", {}),
    ("ste-identity-float", "identity", {"surrogate": "identity"}),
):
    register_method(
        Method(
            _name,
            f"float for a fraction float_frac of the steps (default {FLOAT_FRAC_DEFAULT:g}), then quantized "
            f"(LSQ steps set from the trained weights, a fresh optimizer) and trained with the {_what} STE",
            _quant,
            base_optimizer,
            options=("float_frac",),
            float_phase=True,
        )
    )


# the other registering modules, after the STE family: the curricula extend it and FOGZO
from . import wrapper_methods  # noqa: E402,F401,I001
from . import peers  # noqa: E402,F401,I001
from . import curriculum_methods  # noqa: E402,F401,I001
