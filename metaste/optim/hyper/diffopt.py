"""The base optimizer's update as a differentiable function of the surrogate parameters
(docs/design.md §3.2), and the one-step hypergradient built on it.

This is the one place where metaste builds ``v_{t+1}(θ) = OPT(v_t, g_t ⊙ ψ(u_t; θ), state_t)``
with a graph back to θ. Every hypergradient method (``delayed``; the horizon methods
``fagu``/``pfagu``/``lgatt``, docs/design.md §3.3–3.4) uses it the same way; the one-step
hypergradient ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩ of ``delayed`` and ``fagu`` is
:func:`one_step_hypergradient`::

    rec = record_update(optimizer, params)        # before optimizer.step(): v_t, state_t, hparams
    optimizer.step()                              # the real update, untouched
    ...
    theta = [a.detach().requires_grad_()]         # leaf copies of the surrogate parameters
    grads = [g_t * psi_differentiable(surrogate, u_t, qn, qp, theta)]
    v_next = differentiable_update(rec, grads)    # v_{t+1} as a function of theta
    h = torch.autograd.grad(v_next, theta, grad_outputs=[dL_dv_next])   # ⟨λ, ∂v_{t+1}/∂θ⟩

An :class:`UpdateRecord` holds detached clones only (no graph), so it can be kept across steps
and saved in a ``state_dict`` (:meth:`UpdateRecord.state_dict`): a checkpoint taken between
recording and use resumes exactly.

How the differentiable update is computed: torch.optim's own ``differentiable=True`` mode
(SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, Adadelta, RMSprop, Rprop, ASGD) drives a
fresh instance of the base optimizer's class over cloned parameters and cloned state, so the
real optimizer and parameters are never touched. Three repairs:

* SGD with momentum detaches its first momentum buffer (``buf = grad.detach().clone()``); the
  clone starts from a zero buffer with ``dampening = 0`` instead, which gives the same value
  (``0·m + 1·grad``) with the graph kept.
* Optimizers that divide by a root of a second-moment estimate (everything except SGD/ASGD)
  have an infinite derivative where that estimate is exactly 0; autograd turns it into NaN
  (0·∞). Elements whose surrogate gradient is exactly 0 are therefore fed to the clone as
  detached zeros: their contribution to the hypergradient is dropped (it is 0 for SLSTE in
  ``boundary="none"`` mode anyway, where ψ = 0 ⇒ ∂ψ/∂a = 0).
* (Not a repair, a property of torch:) the differentiable Adam family computes its bias
  correction from the float32 ``step`` tensor, so the clone's v_{t+1} equals the real one to
  float32 rounding of that factor (1 − β₂ in float32: relative ~1e-5), also for float64 parameters.
* An optimizer class without a ``differentiable`` mode (third-party) falls back to treating the
  update as ``v − lr·g`` for the hypergradient only, with a warning.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ...quant.learnable import psi_differentiable
from ...quant.registry import QuantEntry

__all__ = [
    "UpdateRecord",
    "record_update",
    "differentiable_update",
    "differentiable_step",
    "has_differentiable_mode",
    "one_step_hypergradient",
]

# optimizers whose update is linear in the gradient: no second-moment root, nothing to mask
_LINEAR_IN_GRAD = (torch.optim.SGD, torch.optim.ASGD)


def has_differentiable_mode(optimizer_cls: type[Optimizer]) -> bool:
    """Whether ``optimizer_cls`` takes torch.optim's ``differentiable=True`` flag."""
    return "differentiable" in inspect.signature(optimizer_cls.__init__).parameters


def _clone_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


@dataclass
class UpdateRecord:
    """Inputs of one base-optimizer update of some parameters, detached (no graph).

    Attributes:
        optimizer_cls: the base optimizer's class.
        params: v_t, one clone per parameter.
        states: the optimizer state of each parameter *before* the update (cloned).
        groups: the hyperparameters of each parameter's group at the update (no ``"params"``),
            e.g. the ``lr`` a scheduler had set.
    """

    optimizer_cls: type[Optimizer]
    params: list[Tensor]
    states: list[dict[str, Any]]
    groups: list[dict[str, Any]]

    def state_dict(self) -> dict[str, Any]:
        return {"params": self.params, "states": self.states, "groups": self.groups}

    @classmethod
    def from_state_dict(cls, optimizer_cls: type[Optimizer], sd: dict[str, Any]) -> UpdateRecord:
        return cls(optimizer_cls, list(sd["params"]), list(sd["states"]), list(sd["groups"]))


def record_update(optimizer: Optimizer, params: list[Tensor], *, light: bool = False) -> UpdateRecord:
    """Snapshot what :func:`differentiable_update` needs; call it right before ``optimizer.step()``.

    ``light=True`` (what :func:`one_step_hypergradient` needs, no more): for plain
    ``torch.optim.SGD``, whose update is linear in the gradient, the hypergradient needs only the
    group's hyperparameters and whether a momentum buffer existed, so v_t and the state are not
    cloned (``params`` is empty, a state holds ``{"momentum_buffer": None}`` or nothing). For
    ``Adam`` / ``AdamW`` without amsgrad and maximize (and, for Adam, without weight decay),
    ∂v_{t+1}/∂G needs only the state *after* the update, which the optimizer still holds when the
    hypergradient is taken (before the next step): nothing but the hyperparameters is recorded,
    and :func:`one_step_hypergradient` is given the live state. Such a record cannot be replayed
    by :func:`differentiable_update`. Other optimizers: a full record.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups = [{k: _clone_value(v) for k, v in group_of[id(p)].items() if k != "params"} for p in params]
    if light and params and all(_adam_closed_form(type(optimizer), g) for g in groups):
        return UpdateRecord(type(optimizer), [], [{} for _ in params], groups)
    if light and type(optimizer) is torch.optim.SGD:
        states = [
            {"momentum_buffer": None} if optimizer.state.get(p, {}).get("momentum_buffer") is not None else {}
            for p in params
        ]
        return UpdateRecord(type(optimizer), [], states, groups)
    states = [{k: _clone_value(v) for k, v in optimizer.state.get(p, {}).items()} for p in params]
    return UpdateRecord(type(optimizer), [p.detach().clone() for p in params], states, groups)


def _adam_closed_form(cls: type[Optimizer], group: dict[str, Any]) -> bool:
    """Whether :func:`_adam_hypergradient` covers this optimizer class and group."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if group.get("amsgrad") or group.get("maximize") or isinstance(group.get("lr"), Tensor):
        return False
    return cls is torch.optim.AdamW or float(group.get("weight_decay", 0.0)) == 0.0


def sgd_gradient_coefficient(group: dict[str, Any], had_buffer: bool) -> float:
    """∂v_{t+1}/∂G of one ``torch.optim.SGD`` step, a scalar (the update is linear in the gradient
    G; weight decay adds a G-independent term): −lr·κ, κ = 1 without momentum; with momentum μ
    and dampening d, κ = 1 − d if a buffer existed (1 on the first step, where torch sets the
    buffer to G), and Nesterov adds μ times that; ``maximize`` flips the sign."""
    lr = float(group["lr"])
    mu = float(group.get("momentum", 0.0) or 0.0)
    kappa = 1.0
    if mu != 0.0:
        buf = (1.0 - float(group.get("dampening", 0.0))) if had_buffer else 1.0
        kappa = 1.0 + mu * buf if group.get("nesterov", False) else buf
    return -lr * kappa * (-1.0 if group.get("maximize", False) else 1.0)


def differentiable_update(
    record: UpdateRecord, grads: list[Tensor], *, consume: bool = False
) -> list[Tensor]:
    """v_{t+1} for each recorded parameter, as a differentiable function of ``grads``.

    ``grads`` are the gradients the update would have used (same order as ``record.params``),
    typically ``g ⊙ ψ(u; θ)`` with a graph to θ. The record is not modified (``consume=False``).
    """
    return differentiable_step(record, grads, consume=consume)[0]


def differentiable_step(
    record: UpdateRecord,
    grads: list[Tensor],
    *,
    params: list[Tensor] | None = None,
    states: list[dict[str, Any]] | None = None,
    consume: bool = False,
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """(v_{t+1}, state_{t+1}) per recorded parameter, differentiable in ``grads`` and, when given,
    in ``params`` (v_t) and ``states`` (the optimizer state before the update).

    ``params`` / ``states`` replace the record's detached v_t / state_t; their tensors may carry a
    graph (e.g. leaves that require grad: LGATT's reverse sweep takes one vector-Jacobian product
    of the whole step, docs/design.md §3.4) and are cloned, never modified. Without them this is
    :func:`differentiable_update` plus the new state. The fallback for an optimizer without a
    ``differentiable`` mode returns the state unchanged. ``consume=True``: the record is used up —
    its v_t and state tensors are updated in place instead of cloned (two to three weight copies
    less with Adam); the record cannot be used again.
    """
    cls = record.optimizer_cls
    v0 = record.params if params is None else params
    if states is None and consume:
        s0 = [dict(st) for st in record.states]
    elif states is None:
        s0 = [{k: _clone_value(v) for k, v in st.items()} for st in record.states]
    else:  # clone, keeping the graph: the update runs in place on the state
        s0 = [
            {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()}
            for st in states
        ]
    if not has_differentiable_mode(cls):
        warnings.warn(
            f"{cls.__name__} has no differentiable=True mode: the hypergradient treats its update "
            "as v - lr*g (plain SGD); use a torch.optim optimizer for the exact update",
            stacklevel=3,
        )
        return [p - g * float(hp["lr"]) for p, g, hp in zip(v0, grads, record.groups)], s0
    mask = not issubclass(cls, _LINEAR_IN_GRAD)
    clones, groups = [], []
    for p, hp in zip(v0, record.groups):
        hp = {k: _clone_value(v) for k, v in hp.items()}
        hp["differentiable"] = True
        for flag in ("foreach", "fused"):  # differentiable mode is single-tensor only
            if flag in hp:
                hp[flag] = False
        # the record's v_t: a leaf that does not require grad (in-place updates build the graph);
        # a given v_t with a graph: a non-leaf clone
        clone = p if consume and params is None else p.clone()
        clones.append(clone)
        groups.append({**hp, "params": [clone]})
    # the constructor's defaults decide whether step() runs with grad enabled
    sig = inspect.signature(cls.__init__).parameters
    opt = cls(groups, differentiable=True, **{f: False for f in ("foreach", "fused") if f in sig})
    for clone, g, state, group in zip(clones, grads, s0, opt.param_groups):
        if issubclass(cls, torch.optim.SGD) and group["momentum"] != 0 and "momentum_buffer" not in state:
            # SGD's first step detaches buf = grad; 0·m + 1·grad is the same value with the graph
            state["momentum_buffer"] = torch.zeros_like(clone)
            group["dampening"] = 0.0
        if state:
            opt.state[clone] = state
        # exact-zero surrogate gradients enter as detached zeros (see the module docstring)
        clone.grad = torch.where(g.detach() == 0, g.detach(), g) if mask else g
    opt.step()
    return clones, [opt.state[c] for c in clones]


def one_step_hypergradient(
    record: UpdateRecord,
    entries: Sequence[QuantEntry],
    grads: Sequence[Tensor],
    us: Sequence[Tensor],
    thetas: Sequence[Sequence[Tensor]],
    lams: Sequence[Tensor | None],
    *,
    consume: bool = False,
    live_states: Sequence[dict[str, Any]] | None = None,
) -> list[list[Tensor | None]]:
    """h = ⟨λ_{t+1}, ∂v_{t+1}/∂θ_t⟩ for each recorded weight and each of its surrogate tensors
    (docs/design.md §3.2; thesis eq. 4.13 and A.2)::

        v_{t+1}(θ) = OPT(v_t, g_t ⊙ ψ(u_t; θ), state_t)          (differentiable_update)
        h          = ∂⟨λ_{t+1}, v_{t+1}(θ)⟩/∂θ  at θ = θ_t         (one vector-Jacobian product)

    ``record`` is the update v_t → v_{t+1} of the weights ``entries`` (their surrogate, Qn, Qp),
    ``grads``/``us`` their raw gradients g_t = ∂L_t/∂v̂_t and u_t, ``thetas`` the surrogate
    parameters θ_t used (values; leaf copies are made here), ``lams`` λ_{t+1} = g_{t+1} ⊙ ψ_{t+1}
    (``None``: the weight got no gradient at t+1; its h are ``None``). For plain SGD,
    ∂v_{t+1}/∂θ = −η_w·g_t ⊙ ∂ψ(u_t; θ)/∂θ; any torch.optim optimizer works through its
    differentiable mode. A u may be the one-byte code of ``surrogate.code`` (SLSTE). ``consume=True``:
    the record and, where ``grads`` / ``us`` are lists, their entries are used up (an entry is set
    to ``None`` once its weight is done: a weight copy less at the peak).
    """
    if record.optimizer_cls is torch.optim.SGD:
        return _sgd_hypergradient(record, entries, grads, us, thetas, lams, consume)
    if not record.params and record.groups:  # a light Adam/AdamW record (record_update)
        if live_states is None:
            raise ValueError(
                "a light Adam record needs the optimizer's state after the update (live_states=)"
            )
        return _adam_hypergradient(record, entries, grads, us, thetas, lams, live_states, consume)
    leaves, diff_grads = [], []
    for e, g, u, theta in zip(entries, grads, us, thetas):
        th = [x.detach().clone().requires_grad_() for x in theta]
        leaves.append(th)
        diff_grads.append(g * psi_differentiable(e.surrogate, u, e.qn, e.qp, th))
    v_next = differentiable_update(record, diff_grads, consume=consume)
    keep = [n for n, lam in enumerate(lams) if lam is not None]  # weights with a gradient at t+1
    flat = [x for n in keep for x in leaves[n]]
    hs = iter(
        torch.autograd.grad(
            [v_next[n] for n in keep], flat, grad_outputs=[lams[n] for n in keep], allow_unused=True
        )
        if keep
        else ()
    )
    return [
        [next(hs) for _ in leaves[n]] if lams[n] is not None else [None] * len(leaves[n])
        for n in range(len(lams))
    ]


def _sgd_hypergradient(
    record: UpdateRecord,
    entries: Sequence[QuantEntry],
    grads: Sequence[Tensor],
    us: Sequence[Tensor],
    thetas: Sequence[Sequence[Tensor]],
    lams: Sequence[Tensor | None],
    consume: bool = False,
) -> list[list[Tensor | None]]:
    """:func:`one_step_hypergradient` for plain ``torch.optim.SGD`` in closed form (no
    clones, no graph): v_{t+1} is linear in G = g ⊙ ψ(u; θ) with the scalar slope
    :func:`sgd_gradient_coefficient`, so h = Σ_to_θ (λ·slope) ⊙ g ⊙ ∂ψ/∂θ — the products autograd
    forms through the differentiable update, in the same order."""
    out: list[list[Tensor | None]] = []
    for n, (e, theta, lam, group, state) in enumerate(
        zip(entries, thetas, lams, record.groups, record.states)
    ):
        if lam is None:
            out.append([None] * len(theta))
            continue
        had_buffer = "momentum_buffer" in state  # torch.optim.SGD stores it only with momentum
        # ∂⟨λ, v_{t+1}⟩/∂ψ
        w = torch.mul(lam, sgd_gradient_coefficient(group, had_buffer)).mul_(_take(grads, n, consume))
        th = [x.detach() for x in theta]
        out.append(_contract(w, e.surrogate.dpsi(_take(us, n, consume), e.qn, e.qp, th), th))
        del w
    return out


def _take(xs: Sequence[Tensor], n: int, consume: bool) -> Tensor:
    """``xs[n]``; with ``consume`` and a list, the entry is dropped from it (the caller's last use)."""
    x = xs[n]
    if consume and isinstance(xs, list):
        xs[n] = None
    return x


def _contract(w: Tensor, dpsi: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
    """(w ⊙ ∂ψ/∂θ_k) summed to θ_k's shape, per k; the last product in w's buffer (w is the
    caller's own: one weight copy less)."""
    last = len(dpsi) - 1
    return [
        (w.mul_(d) if k == last and d.shape == w.shape else w * d).sum_to_size(x.shape)
        for k, (d, x) in enumerate(zip(dpsi, theta))
    ]


def _adam_hypergradient(
    record: UpdateRecord,
    entries: Sequence[QuantEntry],
    grads: Sequence[Tensor],
    us: Sequence[Tensor],
    thetas: Sequence[Sequence[Tensor]],
    lams: Sequence[Tensor | None],
    live_states: Sequence[dict[str, Any]],
    consume: bool = False,
) -> list[list[Tensor | None]]:
    """:func:`one_step_hypergradient` for Adam / AdamW in closed form from the state after the
    update (m′, s′, t; no clone of v_t, m_t, s_t, no graph). With G = g ⊙ ψ(u; θ),
    D = √s′/√bc₂ + ε and the step size α = lr/bc₁ (bc_k = 1 − β_k^t), element-wise

        ∂v_{t+1}/∂G = −α·[(1 − β₁)/D − m′·(1 − β₂)·G / (D²·√bc₂·√s′)]

    evaluated with the bias corrections rounded as torch's differentiable Adam rounds them.

    (AdamW's decoupled decay does not depend on G). Elements with G = 0 count as constants, as in
    the differentiable replay (docs/design.md §3.2). Agrees with it to float32 rounding."""
    out: list[list[Tensor | None]] = []
    for n, (e, theta, lam, group, st) in enumerate(zip(entries, thetas, lams, record.groups, live_states)):
        th = [x.detach() for x in theta]
        if lam is None:
            out.append([None] * len(th))
            continue
        beta1, beta2 = (float(b) for b in group["betas"])
        # the scalars exactly as torch's differentiable Adam forms them (from the float32 step
        # tensor): v_{t+1} = v + m′/den, den = √s′/A + E, A = √bc₂·(−α), E = ε/(−α)
        step = st["step"] if isinstance(st["step"], Tensor) else torch.tensor(float(st["step"]))
        neg_alpha = (float(group["lr"]) / (1 - beta1**step)).neg()
        big_a = (1 - beta2**step).sqrt() * neg_alpha
        g, u = _take(grads, n, consume), _take(us, n, consume)
        G = e.surrogate.psi(u, e.qn, e.qp, th).mul_(g)
        constant = G == 0
        sq = st["exp_avg_sq"].sqrt()
        den = (sq / big_a).add_(float(group["eps"]) / neg_alpha)
        # ∂v_{t+1}/∂G = (1 − β₁)/den − m′·(1 − β₂)·G / (den²·A·√s′); the second term is formed in
        # G's buffer (three weight-sized temporaries at the peak, not four)
        t = torch.mul(st["exp_avg"], G, out=G).mul_(1.0 - beta2).div_(den).div_(den).div_(big_a).div_(sq)
        del sq
        J = den.reciprocal_().mul_(1.0 - beta1).sub_(t)
        del t, den, G
        J.masked_fill_(constant, 0.0)
        w = J.mul_(lam).mul_(g)  # ∂⟨λ, v_{t+1}⟩/∂ψ
        del J, g, constant
        out.append(_contract(w, e.surrogate.dpsi(u, e.qn, e.qp, th), th))
        del w, u
    return out
