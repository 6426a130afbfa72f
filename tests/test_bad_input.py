"""The bad-input matrix: what a user does → the exception type and a word its message
must contain, and afterwards the weights, buffers and optimizer state (base and wrapper) are
``torch.equal`` to what they were. Each case builds its own small Conv+BN+Linear model (or MLP)
and returns ``(model, opt, action)``; ``opt`` is the wrapper, or a bare SGD over the model when
the action is the wrapper's construction or a quantization call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import FOGZO, PEGE, Calibrated, HyperSTE, JacQuant, NonFiniteLossError
from tests.helpers.reliability import assert_untouched, capture, closure_for, cnn, fogzo, hyper, images

CASES: dict[str, tuple] = {}


def case(exc: type[BaseException], word: str):
    def register(fn):
        CASES[fn.__name__] = (fn, exc, word)
        return fn

    return register


def _nan_images():
    x, y = images()
    x[0, 0, 2, 2] = float("nan")
    return x, y


def _stepped(opt, model):
    opt.step(closure_for(model, *images(seed=7)))  # one good step first: non-trivial state
    return opt


def _wrapper(kind, **kw):
    """A model and its wrapper of ``kind`` (fogzo, a HyperSTE method, pege, jacquant, calibrated),
    stepped once."""
    surrogate = {"fogzo": "ste", "pege": "ste", "jacquant": "ste", "calibrated": "leaky"}.get(kind, "slste")
    model = cnn(surrogate=surrogate, **({"granularity": "tensor"} if kind == "calibrated" else {}))
    if kind == "fogzo":
        opt = fogzo(model, **kw)
    elif kind == "pege":
        opt = PEGE(_bare(model), total_steps=50, **kw)
    elif kind == "jacquant":
        opt = JacQuant(_bare(model), group=1, **kw)
    elif kind == "calibrated":
        opt = Calibrated(_bare(model), **kw)
    elif kind == "fagu":
        opt = HyperSTE(_bare(model), method="fagu", model=model, horizon=3, replays=2, **kw)
    else:
        opt = hyper(model, kind, **kw)
    return model, _stepped(opt, model)


def _bare(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _stepping(kind, closure):
    """Build a case: ``kind``'s wrapper, stepped once, then stepped with ``closure(model, x, y)``."""

    def build():
        model, opt = _wrapper(kind)
        x, y = images()
        return model, opt, lambda: opt.step(closure(model, x, y))

    return build


def _nan_batch(m, *_):
    """A closure over the batch with one NaN pixel."""
    return closure_for(m, *_nan_images())


# -- step --------------------------------------------------------------------------------------


# the step protocol every wrapper shares: the same bad closures, on each of the five
# (case, exception, the word its message names, what step is handed given model and batch)
_STEP_DEFECTS = [
    ("closure_not_callable", TypeError, "callable", lambda m, x, y: torch.tensor(1.0)),
    (
        "closure_returns_float",
        TypeError,
        "torch.Tensor",
        lambda m, x, y: lambda: float(F.cross_entropy(m(x), y)),
    ),
    ("closure_returns_strings", TypeError, "return the loss tensor alone", lambda m, x, y: lambda: ["loss"]),
    (
        "closure_returns_loss_and_aux",
        TypeError,
        "return the loss tensor alone",
        lambda m, x, y: lambda: (F.cross_entropy(m(x), y), m(x).detach()),
    ),
    (
        "closure_returns_unreduced_loss",
        ValueError,
        "scalar",
        lambda m, x, y: lambda: F.cross_entropy(m(x), y, reduction="none"),
    ),
    (
        "closure_returns_an_empty_generator",
        ValueError,
        "empty",
        lambda m, x, y: lambda: (F.cross_entropy(m(x), y) for _ in ()),
    ),
    (
        "inf_loss",
        NonFiniteLossError,
        "non-finite",
        lambda m, x, y: lambda: F.cross_entropy(m(x), y) * float("inf"),
    ),
    ("nan_pixel", NonFiniteLossError, "non-finite", _nan_batch),
]
_FIVE = ("fogzo", "analytical", "pege", "jacquant", "calibrated")

for _kind in _FIVE:
    for _name, _exc, _word, _closure in _STEP_DEFECTS:
        CASES[f"{_kind}_{_name}"] = (_stepping(_kind, _closure), _exc, _word)


# three closure bodies: one runs backward itself, one computes the loss under no_grad, one raises
def _backward(m, x, y):
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    return loss


def _no_grad(m, x, y):
    with torch.no_grad():
        return F.cross_entropy(m(x), y)


def _raising(m, x, y):
    m(x)
    raise KeyError("batch")


def _nan_second_half(m, *_):
    """A closure that yields the losses of two micro-batches of eight, the NaN image in the second."""
    x, y = _nan_images()
    x, y = x.flip(0), y.flip(0)
    return lambda: (F.cross_entropy(m(a), b) for a, b in zip(x.split(8), y.split(8)))


def _scaled(m, x, y):
    """A closure that returns the loss a GradScaler scaled."""
    scaler = torch.amp.GradScaler("cpu")
    return lambda: scaler.scale(F.cross_entropy(m(x), y))


# a bad closure handed to one wrapper's step: (case, whose first word names the wrapper,
# exception, the word its message names, the closure given model and batch)
_BAD_CLOSURES = [
    ("fogzo_closure_runs_backward", RuntimeError, "backward", lambda m, x, y: lambda: _backward(m, x, y)),
    ("fogzo_loss_under_no_grad", ValueError, "require grad", lambda m, x, y: lambda: _no_grad(m, x, y)),
    ("fogzo_closure_raises_after_the_forward", KeyError, "batch", lambda m, x, y: lambda: _raising(m, x, y)),
    (
        "fogzo_wrong_input_channels",
        RuntimeError,
        "channels",
        lambda m, x, y: closure_for(m, torch.rand(16, 3, 8, 8), y),
    ),
    (
        "fogzo_label_out_of_range",
        IndexError,
        "out of bounds",
        lambda m, x, y: closure_for(m, x, torch.full((16,), 12)),
    ),
    ("fogzo_closure_yields_nothing", ValueError, "empty", lambda m, x, y: lambda: iter(())),
    (
        "fogzo_micro_batch_not_reduced",
        ValueError,
        "scalar",
        lambda m, x, y: lambda: (F.cross_entropy(m(x), y, reduction="none") for _ in range(2)),
    ),
    ("fogzo_nan_in_the_second_micro_batch", NonFiniteLossError, "micro-batch 1", _nan_second_half),
    ("delayed_closure_returns_none", TypeError, "torch.Tensor", lambda m, x, y: lambda: None),
    # the NaN pixel on the other HyperSTE methods (analytical's is in the step protocol above)
    ("delayed_nan_pixel", NonFiniteLossError, "non-finite", _nan_batch),
    ("fagu_nan_pixel", NonFiniteLossError, "non-finite", _nan_batch),
    # a GradScaler's scaled loss
    ("fogzo_gradscaler_scaled_loss", ValueError, "GradScaler", _scaled),
    ("delayed_gradscaler_scaled_loss", ValueError, "GradScaler", _scaled),
]


for _name, _exc, _word, _closure in _BAD_CLOSURES:
    CASES[_name] = (_stepping(_name.split("_")[0], _closure), _exc, _word)


@case(ValueError, "closure")
def fogzo_no_closure():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: opt.step()


@case(ValueError, "run_horizon")
def delayed_run_horizon():
    model, opt = _wrapper("delayed")
    return model, opt, lambda: opt.run_horizon([closure_for(model, *images())])


@case(RuntimeError, "not supported")
def fogzo_scaler_step():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: torch.amp.GradScaler("cpu").step(opt, closure_for(model, *images()))


@case(RuntimeError, "Closure use is not currently supported")
def analytical_scaler_step_with_a_closure():
    model, opt = _wrapper("analytical")
    return model, opt, lambda: torch.amp.GradScaler("cpu").step(opt, closure=closure_for(model, *images()))


@case(RuntimeError, "was released")
def hyperste_step_after_release():
    model, opt = _wrapper("delayed")
    x, y = images()
    opt.release()
    return model, opt, lambda: opt.step(lambda: F.cross_entropy(model(x), y))


@case(NonFiniteLossError, "non-finite")
def fogzo_nan_in_a_plain_ste_step():
    model = cnn()
    opt = _stepped(FOGZO(_bare(model), total_steps=10, ste_fraction=1.0), model)
    return model, opt, lambda: opt.step(closure_for(model, *_nan_images()))


@case(NonFiniteLossError, "non-finite")
def fogzo_nan_in_an_nspsa_step_without_backward():
    model = cnn()
    for p in model.parameters():
        p.requires_grad_(metaste.quant.lookup(p) is not None)
    opt = _stepped(FOGZO(_bare(model), beta_schedule=lambda t: 0.0), model)
    return model, opt, lambda: opt.step(closure_for(model, *_nan_images()))


@case(RuntimeError, "perturbed")
def fogzo_closure_fails_in_a_perturbed_pass():
    model, opt = _wrapper("fogzo", restore="copy")  # bitwise; "inplace": tests/optim/fogzo/test_fogzo.py
    x, y = images()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) > 1:
            model(x)
            raise RuntimeError("perturbed pass failed")
        return F.cross_entropy(model(x), y)

    return model, opt, lambda: opt.step(closure)


@case(ValueError, "frozen")
def fogzo_every_weight_frozen_after_construction():
    model, opt = _wrapper("fogzo")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, opt, lambda: opt.step(closure_for(model, *images()))


@case(ValueError, "not initialised")
def fogzo_scale_callable_returns_none():
    model = cnn()
    w = model[0].weight
    opt = FOGZO(_bare(model), total_steps=10, scales={w: lambda: None})
    return model, opt, lambda: opt.step(closure_for(model, *images()))


@case(ValueError, "finite")
def fogzo_scale_callable_returns_zero_later():
    model = cnn()
    scale = {"s": 0.1}
    opt = _stepped(FOGZO(_bare(model), total_steps=10, scales={model[0].weight: lambda: scale["s"]}), model)
    scale["s"] = 0.0
    return model, opt, lambda: opt.step(closure_for(model, *images()))


@case(ValueError, "momentum")
def analytical_momentum_switched_on():
    model, opt = _wrapper("analytical")
    opt.param_groups[0]["momentum"] = 0.9
    return model, opt, lambda: opt.step(closure_for(model, *images()))


@case(ValueError, "closure")
def fagu_no_closure():
    model = cnn(surrogate="slste")
    opt = HyperSTE(_bare(model), method="fagu", model=model, horizon=2, replays=2)
    return model, opt, lambda: opt.step(None)


# -- load_state_dict ---------------------------------------------------------------------------


# a wrapper loads the state_dict of another kind, or of the same kind with other settings:
# (case, wrapper, its settings, the saver, the saver's settings, the word the error names)
_STATE_MISMATCHES = [
    ("fogzo_loads_a_hyperste_state", "fogzo", {}, "delayed", {}, "saved by HyperSTE"),
    ("hyperste_loads_a_fogzo_state", "delayed", {}, "fogzo", {}, "saved by FOGZO"),
    ("analytical_loads_a_delayed_state", "analytical", {}, "delayed", {}, "method"),
    ("fogzo_loads_another_seed", "fogzo", {}, "fogzo", {"seed": 5}, "seed=5"),
    ("fogzo_loads_another_n", "fogzo", {}, "fogzo", {"n": 3}, "n=3"),
    ("delayed_loads_another_window", "delayed", {}, "delayed", {"window": 3}, "window=3"),
    ("analytical_loads_another_hyper_lr", "analytical", {}, "analytical", {"hyper_lr": 0.5}, "hyper_lr"),
    ("pege_loads_a_jacquant_state", "pege", {}, "jacquant", {}, "saved by JacQuant"),
    ("jacquant_loads_a_calibrated_state", "jacquant", {}, "calibrated", {}, "saved by Calibrated"),
    ("calibrated_loads_a_pege_state", "calibrated", {}, "pege", {}, "saved by PEGE"),
    ("pege_loads_another_lam", "pege", {}, "pege", {"lam": 0.5}, "lam=0.5"),
    ("jacquant_loads_another_vr", "jacquant", {}, "jacquant", {"vr": "storm"}, "vr='storm'"),
    ("calibrated_loads_another_every", "calibrated", {}, "calibrated", {"every": 3}, "every=3"),
]


def _loads_other_state(kind, kw, saver, saver_kw):
    def build():
        model, opt = _wrapper(kind, **kw)
        sd = _wrapper(saver, **saver_kw)[1].state_dict()
        return model, opt, lambda: opt.load_state_dict(sd)

    return build


for _name, _kind, _kw, _saver, _saver_kw, _word in _STATE_MISMATCHES:
    CASES[_name] = (_loads_other_state(_kind, _kw, _saver, _saver_kw), ValueError, _word)


@case(ValueError, "metaste")
def fogzo_loads_a_bare_optimizer_state():
    model, opt = _wrapper("fogzo")
    sd = opt.optimizer.state_dict()
    return model, opt, lambda: opt.load_state_dict(sd)


@case(ValueError, "Adam")
def fogzo_loads_a_state_over_another_optimizer():
    model, opt = _wrapper("fogzo")
    other_model = cnn()
    other = _stepped(FOGZO(torch.optim.Adam(other_model.parameters()), total_steps=100), other_model)
    sd = other.state_dict()
    return model, opt, lambda: opt.load_state_dict(sd)


@case(ValueError, "dict")
def fogzo_loads_a_damaged_state():
    model, opt = _wrapper("fogzo")
    sd = opt.state_dict()
    sd["metaste"] = 3
    return model, opt, lambda: opt.load_state_dict(sd)


# -- construction ------------------------------------------------------------------------------


def _bf16_wrapper(kind):
    if kind == "calibrated":
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        model = metaste.quantize_model(net, bits=2, surrogate="leaky", granularity="tensor")
    else:
        model = cnn()
    model = model.to(torch.bfloat16)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    build = {
        "pege": lambda: metaste.PEGE(base, total_steps=10, model=model),
        "jacquant": lambda: metaste.JacQuant(base),
        "calibrated": lambda: metaste.Calibrated(base),
    }[kind]
    return model, base, build


for _kind in ("pege", "jacquant", "calibrated"):
    CASES[f"{_kind}_bf16_latents"] = (lambda k=_kind: _bf16_wrapper(k), TypeError, "must be float32")


@case(ValueError, "none of whose parameters the optimizer trains")
def pege_model_other_than_the_trained_one():
    model, other = cnn(surrogate="ste"), cnn(surrogate="ste")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, base, lambda: metaste.PEGE(base, total_steps=10, model=other)


@case(TypeError, "again")
def fogzo_over_fogzo():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: FOGZO(opt, total_steps=10)


@case(ValueError, "already driven by a HyperSTE")
def hyperste_twice_over_the_same_weights():
    model, opt = _wrapper("delayed")
    return model, opt, lambda: HyperSTE(_bare(model), method="delayed")


def _slste():
    return cnn(surrogate="slste")


def _bf16(make_model):
    return lambda: make_model().to(torch.bfloat16)


def _float_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


# a wrapper built over a fresh SGD, with bad keywords or over a model it can't drive:
# (case, exception, the word its message names, the model, the wrapper, its keywords)
_CONSTRUCTIONS = [
    ("fogzo_zero_directions", ValueError, "n", cnn, FOGZO, {"n": 0, "total_steps": 10}),
    ("fogzo_without_total_steps", ValueError, "total_steps", cnn, FOGZO, {}),
    ("fogzo_over_a_float_model", ValueError, "no managed", _float_net, FOGZO, {"total_steps": 10}),
    ("fogzo_over_bf16_latents", TypeError, "bfloat16", _bf16(cnn), FOGZO, {"total_steps": 10}),
    (
        "fogzo_scales_names_a_foreign_tensor",
        ValueError,
        "not a parameter",
        cnn,
        FOGZO,
        {"total_steps": 10, "scales": {torch.zeros(3): 0.1}},
    ),
    ("hyperste_unknown_method", ValueError, "Unknown method", _slste, HyperSTE, {"method": "analytic"}),
    ("delayed_window_one", ValueError, "window", _slste, HyperSTE, {"method": "delayed", "window": 1}),
    (
        "delayed_with_an_analytical_option",
        TypeError,
        "does not take",
        _slste,
        HyperSTE,
        {"method": "delayed", "resolve": "halve"},
    ),
    ("hyperste_over_a_fixed_surrogate", ValueError, "learnable", cnn, HyperSTE, {"method": "delayed"}),
    ("hyperste_over_bf16_latents", TypeError, "bfloat16", _bf16(_slste), HyperSTE, {"method": "delayed"}),
    ("fagu_without_model", ValueError, "model=", _slste, HyperSTE, {"method": "fagu", "horizon": 2}),
]


def _constructing(make_model, wrapper, kw):
    def build():
        model = make_model()
        return model, _bare(model), lambda: wrapper(_bare(model), **kw)

    return build


for _name, _exc, _word, _make_model, _cls, _kw in _CONSTRUCTIONS:
    CASES[_name] = (_constructing(_make_model, _cls, _kw), _exc, _word)


@case(TypeError, "torch.optim.Optimizer")
def fogzo_over_parameters_instead_of_an_optimizer():
    model = cnn()
    return model, _bare(model), lambda: FOGZO(model.parameters(), total_steps=10)


@case(ValueError, "SGD")
def analytical_over_adam():
    model = cnn(surrogate="slste")
    return model, _bare(model), lambda: HyperSTE(torch.optim.Adam(model.parameters()), method="analytical")


# -- the substrate -----------------------------------------------------------------------------


# quantize_model over the small net, with a bad keyword: (case, the word its message names, keywords)
_QUANTIZATIONS = [
    ("quantize_with_zero_bits", "bits", {"bits": 0}),
    ("quantize_keeping_an_unknown_module", "keep_fp", {"bits": 2, "keep_fp": ["fc9"]}),
    ("quantize_with_an_unknown_surrogate", "surrogate", {"bits": 2, "surrogate": "slstee", "inplace": True}),
]


def _quantizing(kw):
    def build():
        model = cnn()
        return model, _bare(model), lambda: metaste.quantize_model(model, **kw)

    return build


for _name, _word, _kw in _QUANTIZATIONS:
    CASES[_name] = (_quantizing(_kw), ValueError, _word)


# a checkpoint of another grid loads into a quantized model: (case, the model's, the checkpoint's)
_GRID_MISMATCHES = [
    ("load_a_2bit_checkpoint_into_a_3bit_model", {"bits": 3}, {"bits": 2}),
    ("load_an_lsq_checkpoint_into_a_fixed_model", {"quantizer": "fixed"}, {"quantizer": "lsq"}),
    ("load_a_plste_checkpoint_into_an_slste_model", {"surrogate": "slste"}, {"surrogate": "plste"}),
]


def _loads_another_grid(kw, saved_kw):
    def build():
        model = cnn(**kw)
        sd = cnn(**saved_kw).state_dict()
        return model, _bare(model), lambda: model.load_state_dict(sd)

    return build


for _name, _kw, _saved_kw in _GRID_MISMATCHES:
    CASES[_name] = (_loads_another_grid(_kw, _saved_kw), ValueError, "grid")


@case(RuntimeError, "eval mode")
def activation_quantizer_used_in_eval_before_training():
    model = cnn(act_bits=4).eval()
    return model, _bare(model), lambda: model(images()[0])


def test_the_matrix_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_clear_error_and_changes_nothing(name):
    build, exc, word = CASES[name]
    model, opt, action = build()
    before = capture(model, opt)
    with pytest.raises(exc, match=word):
        action()
    assert_untouched(before, model, opt)
