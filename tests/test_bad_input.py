"""The bad-input matrix: what a user does → the exception type and a word its message
must contain, and afterwards the weights, buffers and optimizer state (base and wrapper) are
``torch.equal`` to what they were. Each case builds its own small Conv+BN+Linear model (or MLP)
and returns ``(model, opt, action)``; ``opt`` is the wrapper, or a bare SGD over the model when
the action is the wrapper's construction or a quantization call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reliability_helpers import assert_untouched, capture, closure_for, cnn, fogzo, hyper, images
from torch import nn

import metaste
from metaste import FOGZO, PEGE, Calibrated, HyperSTE, JacQuant, NonFiniteLossError

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
    else:
        opt = hyper(model, kind, **kw)
    return model, _stepped(opt, model)


def _bare(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# -- FOGZO.step --------------------------------------------------------------------------------


@case(ValueError, "closure")
def fogzo_no_closure():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: opt.step()


# the step protocol every wrapper shares: the same bad closures, on each of the five
# (case, exception, the word its message names, the step to take given model, opt, batch)
_STEP_DEFECTS = [
    ("closure_not_callable", TypeError, "callable", lambda m, o, x, y: o.step(torch.tensor(1.0))),
    (
        "closure_returns_float",
        TypeError,
        "torch.Tensor",
        lambda m, o, x, y: o.step(lambda: float(F.cross_entropy(m(x), y))),
    ),
    (
        "closure_returns_strings",
        TypeError,
        "return the loss tensor alone",
        lambda m, o, x, y: o.step(lambda: ["loss"]),
    ),
    (
        "closure_returns_loss_and_aux",
        TypeError,
        "return the loss tensor alone",
        lambda m, o, x, y: o.step(lambda: (F.cross_entropy(m(x), y), m(x).detach())),
    ),
    (
        "closure_returns_unreduced_loss",
        ValueError,
        "scalar",
        lambda m, o, x, y: o.step(lambda: F.cross_entropy(m(x), y, reduction="none")),
    ),
    (
        "closure_returns_an_empty_generator",
        ValueError,
        "empty",
        lambda m, o, x, y: o.step(lambda: (F.cross_entropy(m(x), y) for _ in ())),
    ),
    (
        "inf_loss",
        NonFiniteLossError,
        "non-finite",
        lambda m, o, x, y: o.step(lambda: F.cross_entropy(m(x), y) * float("inf")),
    ),
    (
        "nan_pixel",
        NonFiniteLossError,
        "non-finite",
        lambda m, o, x, y: o.step(closure_for(m, *_nan_images())),
    ),
]
_FIVE = ("fogzo", "analytical", "pege", "jacquant", "calibrated")


def _step_defect(kind, act):
    def build():
        model, opt = _wrapper(kind)
        x, y = images()
        return model, opt, lambda: act(model, opt, x, y)

    return build


for _kind in _FIVE:
    for _name, _exc, _word, _act in _STEP_DEFECTS:
        CASES[f"{_kind}_{_name}"] = (_step_defect(_kind, _act), _exc, _word)


@case(RuntimeError, "was released")
def hyperste_step_after_release():
    model, opt = _wrapper("delayed")
    x, y = images()
    opt.release()
    return model, opt, lambda: opt.step(lambda: F.cross_entropy(model(x), y))


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


@case(TypeError, "must be float32")
def pege_bf16_latents():
    return _bf16_wrapper("pege")


@case(TypeError, "must be float32")
def jacquant_bf16_latents():
    return _bf16_wrapper("jacquant")


@case(TypeError, "must be float32")
def calibrated_bf16_latents():
    return _bf16_wrapper("calibrated")


@case(ValueError, "none of whose parameters the optimizer trains")
def pege_model_other_than_the_trained_one():
    model, other = cnn(surrogate="ste"), cnn(surrogate="ste")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, base, lambda: metaste.PEGE(base, total_steps=10, model=other)


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


@case(RuntimeError, "backward")
def fogzo_closure_runs_backward():
    model, opt = _wrapper("fogzo")
    x, y = images()

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return model, opt, lambda: opt.step(closure)


@case(ValueError, "require grad")
def fogzo_loss_under_no_grad():
    model, opt = _wrapper("fogzo")
    x, y = images()

    def closure():
        with torch.no_grad():
            return F.cross_entropy(model(x), y)

    return model, opt, lambda: opt.step(closure)


@case(KeyError, "batch")
def fogzo_closure_raises_after_the_forward():
    model, opt = _wrapper("fogzo")
    x, _ = images()

    def closure():
        model(x)
        raise KeyError("batch")

    return model, opt, lambda: opt.step(closure)


@case(RuntimeError, "channels")
def fogzo_wrong_input_channels():
    model, opt = _wrapper("fogzo")
    _, y = images()
    return model, opt, lambda: opt.step(closure_for(model, torch.rand(16, 3, 8, 8), y))


@case(IndexError, "out of bounds")
def fogzo_label_out_of_range():
    model, opt = _wrapper("fogzo")
    x, _ = images()
    return model, opt, lambda: opt.step(closure_for(model, x, torch.full((16,), 12)))


@case(RuntimeError, "perturbed")
def fogzo_closure_fails_in_a_perturbed_pass():
    model, opt = _wrapper("fogzo", restore="copy")  # bitwise; "inplace": tests/optim/test_fogzo.py
    x, y = images()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) > 1:
            model(x)
            raise RuntimeError("perturbed pass failed")
        return F.cross_entropy(model(x), y)

    return model, opt, lambda: opt.step(closure)


@case(ValueError, "GradScaler")
def fogzo_gradscaler_scaled_loss():
    model, opt = _wrapper("fogzo")
    x, y = images()
    scaler = torch.amp.GradScaler("cpu")
    return model, opt, lambda: opt.step(lambda: scaler.scale(F.cross_entropy(model(x), y)))


@case(RuntimeError, "not supported")
def fogzo_scaler_step():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: torch.amp.GradScaler("cpu").step(opt, closure_for(model, *images()))


@case(ValueError, "empty")
def fogzo_closure_yields_nothing():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: opt.step(lambda: iter(()))


@case(ValueError, "scalar")
def fogzo_micro_batch_not_reduced():
    model, opt = _wrapper("fogzo")
    x, y = images()
    return (
        model,
        opt,
        lambda: opt.step(lambda: (F.cross_entropy(model(x), y, reduction="none") for _ in range(2))),
    )


@case(NonFiniteLossError, "micro-batch 1")
def fogzo_nan_in_the_second_micro_batch():
    model, opt = _wrapper("fogzo")
    x, y = _nan_images()
    x, y = x.flip(0), y.flip(0)  # the NaN image in the second half
    return (
        model,
        opt,
        lambda: opt.step(lambda: (F.cross_entropy(model(a), b) for a, b in zip(x.split(8), y.split(8)))),
    )


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


# -- HyperSTE.step -----------------------------------------------------------------------------


@case(NonFiniteLossError, "non-finite")
def analytical_nan_pixel():
    model, opt = _wrapper("analytical")
    return model, opt, lambda: opt.step(closure_for(model, *_nan_images()))


@case(NonFiniteLossError, "non-finite")
def delayed_nan_pixel():
    model, opt = _wrapper("delayed")
    return model, opt, lambda: opt.step(closure_for(model, *_nan_images()))


@case(NonFiniteLossError, "non-finite")
def fagu_nan_pixel():
    model = cnn(surrogate="slste")
    opt = HyperSTE(_bare(model), method="fagu", model=model, horizon=3, replays=2)
    opt = _stepped(opt, model)
    return model, opt, lambda: opt.step(closure_for(model, *_nan_images()))


@case(ValueError, "momentum")
def analytical_momentum_switched_on():
    model, opt = _wrapper("analytical")
    opt.param_groups[0]["momentum"] = 0.9
    return model, opt, lambda: opt.step(closure_for(model, *images()))


@case(TypeError, "torch.Tensor")
def delayed_closure_returns_none():
    model, opt = _wrapper("delayed")
    return model, opt, lambda: opt.step(lambda: None)


@case(ValueError, "GradScaler")
def delayed_gradscaler_scaled_loss():
    model, opt = _wrapper("delayed")
    x, y = images()
    scaler = torch.amp.GradScaler("cpu")
    return model, opt, lambda: opt.step(lambda: scaler.scale(F.cross_entropy(model(x), y)))


@case(RuntimeError, "Closure use is not currently supported")
def analytical_scaler_step_with_a_closure():
    model, opt = _wrapper("analytical")
    return model, opt, lambda: torch.amp.GradScaler("cpu").step(opt, closure=closure_for(model, *images()))


@case(ValueError, "closure")
def fagu_no_closure():
    model = cnn(surrogate="slste")
    opt = HyperSTE(_bare(model), method="fagu", model=model, horizon=2, replays=2)
    return model, opt, lambda: opt.step(None)


@case(ValueError, "run_horizon")
def delayed_run_horizon():
    model, opt = _wrapper("delayed")
    return model, opt, lambda: opt.run_horizon([closure_for(model, *images())])


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


@case(TypeError, "torch.optim.Optimizer")
def fogzo_over_parameters_instead_of_an_optimizer():
    model = cnn()
    return model, _bare(model), lambda: FOGZO(model.parameters(), total_steps=10)


@case(TypeError, "again")
def fogzo_over_fogzo():
    model, opt = _wrapper("fogzo")
    return model, opt, lambda: FOGZO(opt, total_steps=10)


@case(ValueError, "n")
def fogzo_zero_directions():
    model = cnn()
    return model, _bare(model), lambda: FOGZO(_bare(model), n=0, total_steps=10)


@case(ValueError, "total_steps")
def fogzo_without_total_steps():
    model = cnn()
    return model, _bare(model), lambda: FOGZO(_bare(model))


@case(ValueError, "no managed")
def fogzo_over_a_float_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    return model, _bare(model), lambda: FOGZO(_bare(model), total_steps=10)


@case(TypeError, "bfloat16")
def fogzo_over_bf16_latents():
    model = cnn().to(torch.bfloat16)
    return model, _bare(model), lambda: FOGZO(_bare(model), total_steps=10)


@case(ValueError, "not a parameter")
def fogzo_scales_names_a_foreign_tensor():
    model = cnn()
    return model, _bare(model), lambda: FOGZO(_bare(model), total_steps=10, scales={torch.zeros(3): 0.1})


@case(ValueError, "Unknown method")
def hyperste_unknown_method():
    model = cnn(surrogate="slste")
    return model, _bare(model), lambda: HyperSTE(_bare(model), method="analytic")


@case(ValueError, "SGD")
def analytical_over_adam():
    model = cnn(surrogate="slste")
    return model, _bare(model), lambda: HyperSTE(torch.optim.Adam(model.parameters()), method="analytical")


@case(ValueError, "window")
def delayed_window_one():
    model = cnn(surrogate="slste")
    return model, _bare(model), lambda: HyperSTE(_bare(model), method="delayed", window=1)


@case(TypeError, "does not take")
def delayed_with_an_analytical_option():
    model = cnn(surrogate="slste")
    return model, _bare(model), lambda: HyperSTE(_bare(model), method="delayed", resolve="halve")


@case(ValueError, "learnable")
def hyperste_over_a_fixed_surrogate():
    model = cnn(surrogate="ste")
    return model, _bare(model), lambda: HyperSTE(_bare(model), method="delayed")


@case(TypeError, "bfloat16")
def hyperste_over_bf16_latents():
    model = cnn(surrogate="slste").to(torch.bfloat16)
    return model, _bare(model), lambda: HyperSTE(_bare(model), method="delayed")


@case(ValueError, "model=")
def fagu_without_model():
    model = cnn(surrogate="slste")
    return model, _bare(model), lambda: HyperSTE(_bare(model), method="fagu", horizon=2)


@case(ValueError, "already driven by a HyperSTE")
def hyperste_twice_over_the_same_weights():
    model, opt = _wrapper("delayed")
    return model, opt, lambda: HyperSTE(_bare(model), method="delayed")


# -- the substrate -----------------------------------------------------------------------------


@case(ValueError, "bits")
def quantize_with_zero_bits():
    model = cnn()
    return model, _bare(model), lambda: metaste.quantize_model(model, bits=0)


@case(ValueError, "keep_fp")
def quantize_keeping_an_unknown_module():
    model = cnn()
    return model, _bare(model), lambda: metaste.quantize_model(model, bits=2, keep_fp=["fc9"])


@case(ValueError, "surrogate")
def quantize_with_an_unknown_surrogate():
    model = cnn()
    return (
        model,
        _bare(model),
        lambda: metaste.quantize_model(model, bits=2, surrogate="slstee", inplace=True),
    )


@case(ValueError, "grid")
def load_a_2bit_checkpoint_into_a_3bit_model():
    model = cnn(bits=3)
    sd = cnn(bits=2).state_dict()
    return model, _bare(model), lambda: model.load_state_dict(sd)


@case(ValueError, "grid")
def load_an_lsq_checkpoint_into_a_fixed_model():
    model = cnn(quantizer="fixed")
    sd = cnn(quantizer="lsq").state_dict()
    return model, _bare(model), lambda: model.load_state_dict(sd)


@case(ValueError, "grid")
def load_a_plste_checkpoint_into_an_slste_model():
    model = cnn(surrogate="slste")
    sd = cnn(surrogate="plste").state_dict()
    return model, _bare(model), lambda: model.load_state_dict(sd)


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
