"""The metaste wrappers as methods of ``metaste compare``: HyperSTE (per-step and horizon), FOGZO,
the calibrated surrogate, PEGE and JacQuant, each with the options it reads from the command line
and its cost in forward-pass equivalents per step. Registered when :mod:`metaste.bench.methods`
is imported."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from ..optim.calibrated import Calibrated
from ..optim.fogzo.optimizer import FOGZO
from ..optim.hyper.optimizer import HyperSTE
from ..optim.jacquant.optimizer import JacQuant
from ..optim.pege.optimizer import PEGE
from .registry import Method, RunContext, base_optimizer, register_method

# --- HyperSTE (docs/design.md §3.1–3.2) ------------------------------------------------------------------
# RunContext.extra keys read by these methods (all optional): hyper_lr (default 0.01),
# hyper_lr_mode ("normalized" | "raw"), window (2), accumulate ("first" | "sum" | "mean"),
# resolve ("halve" | "threshold" | "passive"). The surrogate is part of the name (quantization is
# fixed per method): delayed-<sgd|adam>[-plste|-dlste]; SLSTE otherwise.


def _hyperste(method: str, optimizer: str):
    def build(model: nn.Module, ctx: RunContext) -> Optimizer:
        if optimizer == "sgd":  # analytical needs plain SGD: the task's momentum is not used
            base = torch.optim.SGD(
                [p for p in model.parameters() if p.requires_grad], lr=ctx.lr, weight_decay=ctx.weight_decay
            )
        else:
            base = base_optimizer(model, ctx, optimizer)
        keys = ("hyper_lr", "hyper_lr_mode", "window", "accumulate", "resolve")
        kw = {k: ctx.extra[k] for k in keys if k in ctx.extra}
        if method == "analytical":
            kw.pop("window", None), kw.pop("accumulate", None)
        else:
            kw.pop("resolve", None)
        return HyperSTE(base, method=method, model=model, **kw)

    return build


register_method(
    Method(
        "analytical",
        "HyperSTE analytical SLSTE (per element, SGD without momentum; docs/design.md §3.1)",
        {"surrogate": "slste", "granularity": "element"},
        _hyperste("analytical", "sgd"),
        options=("hyper_lr", "hyper_lr_mode", "resolve"),
    )
)
for _opt in ("sgd", "adam"):
    for _surr in ("slste", "plste", "dlste"):
        register_method(
            Method(
                f"delayed-{_opt}" + ("" if _surr == "slste" else f"-{_surr}"),
                f"HyperSTE delayed updates, {_surr.upper()}, {_opt.upper()} (k = 2; docs/design.md §3.2)",
                {"surrogate": _surr},
                _hyperste("delayed", _opt),
                options=("hyper_lr", "hyper_lr_mode", "window", "accumulate"),
            )
        )


# --- FOGZO (docs/design.md §4) ---------------------------------------------------------------------------
# RunContext.extra keys read by these methods (all optional): n (directions per step, default 1),
# beta_min (default 1 − 1/D; ignored by nspsa), ste_fraction (default 0.0), restore ("copy" |
# "inplace"), keep_noise (False). Weights use the FOGZO paper's identity STE; β decays over
# ctx.total_steps; the noise seed is ctx.seed.


def _fogzo(one_sided: bool, nspsa: bool):
    def build(model: nn.Module, ctx: RunContext) -> Optimizer:
        keys = ("n", "ste_fraction", "restore", "keep_noise") + (() if nspsa else ("beta_min",))
        kw = {k: ctx.extra[k] for k in keys if k in ctx.extra}
        if nspsa:
            kw["beta_schedule"] = lambda t: 0.0
        return FOGZO(
            base_optimizer(model, ctx), total_steps=ctx.total_steps, one_sided=one_sided, seed=ctx.seed, **kw
        )

    return build


def _fogzo_fwd_equiv(one_sided: bool):
    # the extra passes run on the (1 − ste_fraction) share of steps that are not plain STE
    return lambda ctx: (
        3.0 + (1 if one_sided else 2) * ctx.extra.get("n", 1) * (1.0 - ctx.extra.get("ste_fraction", 0.0))
    )


_FOGZO_OPTIONS = ("n", "ste_fraction", "restore", "keep_noise")


for _name, _what, _one_sided, _nspsa in (
    ("fogzo", "FOGZO, central differences, identity STE (docs/design.md §4); 3 + 2n", False, False),
    ("fogzo-1sided", "FOGZO, one-sided differences (docs/design.md §4.3 option); 3 + n", True, False),
    (
        "nspsa",
        "n-SPSA baseline: FOGZO with β ≡ 0 (pure zeroth order on the quantized weights); 3 + 2n",
        False,
        True,
    ),
):
    register_method(
        Method(
            _name,
            _what + " forward equivalents per step",
            {"surrogate": "identity"},
            _fogzo(one_sided=_one_sided, nspsa=_nspsa),
            _fogzo_fwd_equiv(_one_sided),
            options=_FOGZO_OPTIONS + (() if _nspsa else ("beta_min",)),
        )
    )


# --- HyperSTE horizon methods (docs/design.md §3.3–3.4) --------------------------------------------------
# RunContext.extra keys read by these methods (all optional): hyper_lr (0.01), hyper_lr_mode,
# horizon (steps; default: the whole run for fagu/lgatt — the thesis's single FAGU/FLAGU horizon —
# and total_steps // 10 for pfagu), replays (K; default 5 for all three here, not the thesis's 50,
# to keep `metaste compare` affordable), schedule, last. The task's base optimizer is used. Test-
# metric points inside a horizon see the user's pass (replay 0); the last one sees the final pass.


def _horizon_replays(ctx: RunContext) -> int:
    return int(ctx.extra.get("replays", 5))


def _horizon(method: str):
    def build(model: nn.Module, ctx: RunContext) -> Optimizer:
        default_t = max(1, ctx.total_steps // 10) if method == "pfagu" else ctx.total_steps
        kw = {k: ctx.extra[k] for k in ("hyper_lr", "hyper_lr_mode", "schedule", "last") if k in ctx.extra}
        return HyperSTE(
            base_optimizer(model, ctx),
            method=method,
            model=model,
            horizon=int(ctx.extra.get("horizon", default_t)),
            replays=_horizon_replays(ctx),
            **kw,
        )

    return build


for _m, _cost in (("fagu", 0.0), ("pfagu", 0.0), ("lgatt", 4.0)):
    for _surr in ("slste", "plste", "dlste"):
        register_method(
            Method(
                _m + ("" if _surr == "slste" else f"-{_surr}"),
                f"HyperSTE {_m} (docs/design.md §3.3–3.4), {_surr.upper()}; K replays + final pass ≈ 3(K+1)"
                + (" + 4K (reverse sweep)" if _cost else "")
                + " forward equivalents per step",
                {"surrogate": _surr},
                _horizon(_m),
                lambda ctx, c=_cost: 3.0 * (_horizon_replays(ctx) + 1) + c * _horizon_replays(ctx),
                options=("hyper_lr", "hyper_lr_mode", "schedule", "last", "horizon", "replays"),
            )
        )


# --- Calibrated surrogate (docs/design.md §9) -------------------------------------------------------------
# RunContext.extra keys read (all optional): every (K, default 10), n (1), rho (0.99), ridge (0.1),
# ridge_to ("current" | "ste"), lam_max (1.0), beta (0.0), probe_update ("surrogate" | "fogzo"),
# lam_init (the starting leak λ, default 0: the clipped STE). The probe seed is ctx.seed.
_CALIBRATED_OPTIONS = (
    "every",
    "n",
    "rho",
    "ridge",
    "ridge_to",
    "lam_max",
    "beta",
    "probe_update",
    "lam_init",
)


def _calibrated(model: nn.Module, ctx: RunContext) -> Optimizer:
    kw = {k: ctx.extra[k] for k in _CALIBRATED_OPTIONS if k in ctx.extra and k != "lam_init"}
    opt = Calibrated(base_optimizer(model, ctx), seed=ctx.seed, **kw)
    with torch.no_grad():
        for m in opt.managed:
            m.surrogate.lam.fill_(float(ctx.extra.get("lam_init", 0.0)))
    return opt


def _calibrated_fwd_equiv(ctx: RunContext) -> float:
    # K surrogate steps (3 each) + 2n no-grad forwards per K steps
    return 3.0 + 2.0 * ctx.extra.get("n", 1) / ctx.extra.get("every", 10)


for _gran in ("tensor", "channel"):
    register_method(
        Method(
            "calibrated" + ("" if _gran == "tensor" else "-channel"),
            f"calibrated leaky surrogate ψ = a·in + λ·out per {_gran}, fitted to FOGZO probes every K steps "
            "(docs/design.md §9); 3 + 2n/K forward equivalents per step",
            {"surrogate": "leaky", "granularity": _gran},
            _calibrated,
            _calibrated_fwd_equiv,
            options=_CALIBRATED_OPTIONS,
        )
    )


# --- PEGE (docs/design.md §7) -----------------------------------------------------------------------------
# RunContext.extra keys read (all optional): replace_frac (T_r as a fraction of total_steps, default 0.5),
# k (9), delta (default 1e-3/(2^b - 1) per layer), lam (1e-2). The select mode is part of the name. The mask
# seed is ctx.seed. One forward + backward per step (the mask and the penalty are element-wise).
_PEGE_OPTIONS = ("replace_frac", "k", "delta", "lam")


def _pege(select: str):
    def build(model: nn.Module, ctx: RunContext) -> Optimizer:
        kw = {k: ctx.extra[k] for k in ("k", "delta", "lam") if k in ctx.extra}
        t_r = max(1, int(round(ctx.extra.get("replace_frac", 0.5) * ctx.total_steps)))
        return PEGE(
            base_optimizer(model, ctx), replace_steps=t_r, select=select, model=model, seed=ctx.seed, **kw
        )

    return build


for _sel in ("random", "error"):
    register_method(
        Method(
            "pege" + ("" if _sel == "random" else "-error"),
            f"PEGE, {_sel} masks, log curriculum, EWGS estimator + discretization-error penalty, clipped ψ "
            "(docs/design.md §7); 3 forward equivalents per step",
            {},
            _pege(_sel),
            options=_PEGE_OPTIONS,
        )
    )
register_method(
    Method(
        "pege-identity",
        "PEGE, random masks, with the identity STE as ψ (the curriculum's effect apart from the clip mask); "
        "3 forward equivalents per step",
        {"surrogate": "identity"},
        _pege("random"),
        options=_PEGE_OPTIONS,
    )
)


# --- JacQuant (docs/design.md §8) -------------------------------------------------------------------------
# RunContext.extra keys read (all optional): group (128), every (50), fit ("dither" | "probe"), storm_a (0.1),
# flip_rate (1e-4). vr is part of the name; "storm" evaluates the closure twice per step (≈ 2× compute).
_JACQUANT_OPTIONS = ("group", "every", "fit", "storm_a", "flip_rate")


def _jacquant(vr: str):
    def build(model: nn.Module, ctx: RunContext) -> Optimizer:
        kw = {k: ctx.extra[k] for k in _JACQUANT_OPTIONS if k in ctx.extra}
        return JacQuant(base_optimizer(model, ctx), vr=vr, seed=ctx.seed, **kw)

    return build


for _vr, _cost in (("none", 3.0), ("storm", 6.0)):
    register_method(
        Method(
            "jacquant" + ("" if _vr == "none" else "-storm"),
            f"JacQuant, learned group-wise slope b = clip(α + γφ)·in, vr={_vr} (docs/design.md §8); "
            f"{_cost:g} forward equivalents per step",
            {},
            _jacquant(_vr),
            lambda ctx, c=_cost: c,
            options=_JACQUANT_OPTIONS,
        )
    )
