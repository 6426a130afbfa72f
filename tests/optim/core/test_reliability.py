"""What a wrapper step does with a user's mistakes (docs/design.md §5): an error in ``step()`` leaves
the buffers (BatchNorm statistics, the activation quantizer) as they were; frozen weights, bf16
latents, momentum switched on and a step size that stays unset are clear errors; a loss that
reaches no managed weight and a runaway step size warn. The substrate's are in
tests/quant/test_quant_reliability.py, the bad-input matrix in tests/test_bad_input.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import FOGZO, NonFiniteLossError
from tests.helpers.reliability import assert_untouched, capture, closure_for, cnn, fogzo, hyper, images

# -- an error in step() leaves the buffers (BN statistics, activation quantizer) as they were ----


@pytest.mark.parametrize("wrapper", ["fogzo", "analytical", "delayed"])
def test_nan_batch_leaves_batchnorm_and_everything_else_untouched(wrapper):
    model = cnn(surrogate="ste" if wrapper == "fogzo" else "slste")
    opt = fogzo(model) if wrapper == "fogzo" else hyper(model, wrapper)
    x, y = images()
    opt.step(closure_for(model, x, y))
    before = capture(model, opt)
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="no weight was changed"):
        opt.step(closure_for(model, bad, y))
    assert_untouched(before, model, opt)
    assert torch.isfinite(model.eval()(x)).all()


def test_an_error_in_the_first_step_leaves_the_activation_quantizer_uninitialised():
    model = cnn(act_bits=4)
    opt = fogzo(model)
    x, y = images()
    bad = x.clone()
    bad[1] = float("nan")
    before = capture(model, opt)
    with pytest.raises(NonFiniteLossError):
        opt.step(closure_for(model, bad, y))
    assert_untouched(before, model, opt)
    assert not bool(model[4].act_quant.initialized)
    opt.step(closure_for(model, x, y))  # the first good batch initialises it
    assert bool(model[4].act_quant.initialized)


def test_an_error_raised_by_the_closure_after_the_forward_restores_the_buffers():
    model = cnn()
    opt = fogzo(model)
    x, y = images()
    before = capture(model, opt)

    def closure():
        model(x)
        raise KeyError("user bug after the forward")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert_untouched(before, model, opt)


# -- FOGZO with every managed weight frozen ----------------------------------------------------


def test_fogzo_with_every_weight_frozen_after_construction_is_a_clear_error():
    model = cnn()
    opt = fogzo(model)
    for p in model.parameters():
        p.requires_grad_(False)
    before = capture(model, opt)
    with pytest.raises(ValueError, match="frozen"):
        opt.step(closure_for(model, *images()))
    assert_untouched(before, model, opt)


def test_fogzo_over_frozen_weights_says_they_are_frozen():
    model = cnn()
    for _, e in metaste.quantized_weights(model):
        e.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        fogzo(model)


# -- HyperSTE refuses bf16 latents like FOGZO and quantize_model --------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_latents_are_refused_by_both_wrappers(dtype):
    model = cnn(surrogate="slste").to(dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        hyper(model, "delayed")
    with pytest.raises(TypeError, match=str(dtype)):
        fogzo(model)


# -- analytical checks momentum at step time ---------------------------------------------------


@pytest.mark.parametrize("change", [("momentum", 0.9), ("nesterov", True), ("maximize", True)])
def test_analytical_refuses_momentum_switched_on_after_construction(change):
    model = cnn(surrogate="slste")
    opt = hyper(model, "analytical")
    opt.step(closure_for(model, *images()))
    opt.param_groups[0][change[0]] = change[1]
    before = capture(model, opt)
    with pytest.raises(ValueError, match=change[0]):
        opt.step(closure_for(model, *images(seed=2)))
    assert_untouched(before, model, opt)


# -- scales= with a callable that returns None (torchao before its first forward) ---------------


class _LazyScaled(nn.Module):
    """A layer fake-quantized by "another library" that sets its scale in the first forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 4)
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = float(self.lin.weight.detach().abs().max()) / 1.5
        return self.lin(x)


def test_a_scale_that_is_none_is_read_after_the_first_forward():
    torch.manual_seed(0)
    m = _LazyScaled()
    opt = FOGZO(
        torch.optim.SGD(m.parameters(), lr=0.1), total_steps=10, scales={m.lin.weight: lambda: m.scale}
    )
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    w0 = m.lin.weight.detach().clone()
    opt.step(lambda: F.cross_entropy(m(x), y))
    assert not torch.equal(w0, m.lin.weight)


def test_a_scale_that_stays_none_names_the_weight():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    opt = FOGZO(torch.optim.SGD(lin.parameters(), lr=0.1), total_steps=10, scales={lin.weight: lambda: None})
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(4, 12\)\).*not initialised"):
        opt.step(lambda: F.cross_entropy(lin(x), y))
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


# -- a closure over another model: warn once ----------------------------------------------------


@pytest.mark.parametrize("wrapper", ["fogzo", "delayed"])
def test_a_loss_that_reaches_no_managed_weight_warns_once(wrapper):
    model = cnn(surrogate="ste" if wrapper == "fogzo" else "slste")
    other = copy.deepcopy(model)
    opt = fogzo(model) if wrapper == "fogzo" else hyper(model, wrapper)
    x, y = images()
    with pytest.warns(RuntimeWarning, match="did not reach any of the"):
        opt.step(closure_for(other, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(other, x, y))  # once
        opt.step(closure_for(model, x, y))


# -- FOGZO: a learned step size that runs away is reported ------------------------------------


def test_a_step_size_that_grows_by_an_order_of_magnitude_warns_and_shows_in_the_diagnostics():
    model = cnn(bits=4, keep_last=False)
    opt = fogzo(model)
    x, y = images()
    opt.step(closure_for(model, x, y))
    d = opt.diagnostics["step_sizes"]
    assert len(d) == 3 and all(v["ratio"] == 1.0 for v in d.values())
    with torch.no_grad():
        model[6].weight_quant.s.mul_(20.0)  # what FOGZO's weight diffusion does to the last layer's LSQ step
    with pytest.warns(
        RuntimeWarning,
        match=r"step size of the managed weight parameter 8 \(shape \(10, 16\)\) moved .* \(\d+\.?\d*x\)",
    ):
        opt.step(closure_for(model, x, y))
    ratio = opt.diagnostics["step_sizes"]["parameter 8 (shape (10, 16))"]["ratio"]
    assert ratio == pytest.approx(20.0, rel=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(model, x, y))  # once
    resumed = fogzo(cnn(bits=4, keep_last=False))
    resumed.load_state_dict(opt.state_dict())
    assert resumed.initial_scales == opt.initial_scales  # the reference survives a resume
