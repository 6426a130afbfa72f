"""The step protocol every wrapper runs (docs/design.md §5), parametrized over all five: torch.optim's
``loss.backward(); opt.step()`` and a torch-style closure equal ``opt.step(closure)`` bitwise for the
methods that need one forward; the methods that need more say so; a failed step (a NaN batch, an
error inside the closure, a model the closure reaches only through a container) leaves weights,
optimizer state, BatchNorm statistics and the wrapper's own statistics as they were; a released
wrapper refuses to step; a GradScaler at a fixed scale in float32 changes nothing."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.optim import OptimizerWrapper
from tests.helpers.reliability import assert_untouched, capture, closure_for, cnn, images, same


def _base(model, momentum=0.9):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)


# name → (surrogate of the model, the wrapper over it)
WRAPPERS = {
    "fogzo": ("ste", lambda m, **kw: metaste.FOGZO(_base(m), total_steps=50, **kw)),
    "analytical": ("slste", lambda m, **kw: metaste.HyperSTE(_base(m, 0.0), method="analytical", **kw)),
    "delayed": ("slste", lambda m, **kw: metaste.HyperSTE(_base(m), method="delayed", window=2, **kw)),
    "fagu": ("slste", lambda m, **kw: metaste.HyperSTE(_base(m), method="fagu", horizon=2, model=m, **kw)),
    "pege": ("ste", lambda m, **kw: metaste.PEGE(_base(m), total_steps=50, model=m, **kw)),
    "jacquant": ("ste", lambda m, **kw: metaste.JacQuant(_base(m), every=1, group=1, **kw)),
    "jacquant-storm": ("ste", lambda m, **kw: metaste.JacQuant(_base(m), every=1, group=1, vr="storm", **kw)),
    "calibrated": ("leaky", lambda m, **kw: metaste.Calibrated(_base(m), every=None, **kw)),
    "calibrated-probe": ("leaky", lambda m, **kw: metaste.Calibrated(_base(m), every=2, **kw)),
}
ONE_FORWARD = ["analytical", "delayed", "pege", "jacquant", "calibrated"]
MORE_FORWARDS = ["fogzo", "fagu", "jacquant-storm", "calibrated-probe"]
FIVE = ["fogzo", "analytical", "pege", "jacquant", "calibrated-probe"]


def build(name, **kw):
    surrogate, make = WRAPPERS[name]
    extra = {"granularity": "tensor"} if surrogate == "leaky" else {}
    model = cnn(surrogate=surrogate, quantizer="lsq", keep_last=False, **extra)
    return model, make(model, **kw)


def state_of(model, opt):
    """Weights, buffers (BN statistics, θ) and the wrapper's whole state_dict."""
    return capture(model, opt)


def assert_same_state(a, b):
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def _train(name, mode, steps=4):
    model, opt = build(name)
    for t in range(steps):
        x, y = images(seed=10 + t)
        if mode == "closure":
            opt.step(closure_for(model, x, y))
        elif mode == "backward":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert opt.step() is None
        else:  # torch-style closure: zero_grad and backward inside, as LBFGS / Lightning pass one

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert loss.shape == () and not loss.requires_grad
    return state_of(model, opt)


@pytest.mark.parametrize("name", ONE_FORWARD)
@pytest.mark.parametrize("mode", ["backward", "torch-closure"])
def test_torch_optim_contract_equals_the_closure_step_bitwise(name, mode):
    assert_same_state(_train(name, "closure"), _train(name, mode))


@pytest.mark.parametrize("name", ["delayed", "pege", "jacquant"])
def test_gradients_accumulated_before_a_torch_style_closure_are_kept(name):
    """Lightning's accumulate_grad_batches: the first micro-batches run backward outside the step."""
    (x1, y1), (x2, y2) = images(seed=3, n=8), images(seed=4, n=8)
    ref_model, ref = build(name)
    ref.step(lambda: (F.cross_entropy(ref_model(x), y) / 2 for x, y in ((x1, y1), (x2, y2))))
    model, opt = build(name)
    opt.zero_grad()
    (F.cross_entropy(model(x1), y1) / 2).backward()

    def last():
        loss = F.cross_entropy(model(x2), y2) / 2
        loss.backward()
        return loss

    opt.step(last)
    a, b = state_of(ref_model, ref), state_of(model, opt)
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", MORE_FORWARDS)
def test_methods_that_need_more_forwards_say_so(name):
    model, opt = build(name)
    if name == "calibrated-probe":  # step 1 is no probe step: it runs on your own gradients
        opt.step(closure_for(model, *images(seed=2)))
        F.cross_entropy(model(images(seed=3)[0]), images(seed=3)[1]).backward()
        opt.step()
    F.cross_entropy(model(images(seed=4)[0]), images(seed=4)[1]).backward()
    before = capture(model, opt)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    assert_untouched(before, model, opt)

    def torch_style():
        loss = F.cross_entropy(model(images(seed=5)[0]), images(seed=5)[1])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="called backward"):
        opt.step(torch_style)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("name", ONE_FORWARD)
def test_step_without_gradients_or_with_nonfinite_ones_raises_and_changes_nothing(name):
    model, opt = build(name)
    opt.step(closure_for(model, *images(seed=2)))
    opt.zero_grad()
    before = capture(model, opt)
    with pytest.raises(ValueError, match="loss.backward"):
        opt.step()
    x, y = images(seed=3)
    x[0, 0, 0, 0] = float("nan")
    model.eval()  # the NaN reaches the gradients, not the BN statistics (the user's forward is not the step's)
    F.cross_entropy(model(x), y).backward()
    model.train()
    before = capture(model, opt)
    with pytest.raises(metaste.NonFiniteLossError, match="NaN or inf"):
        opt.step()
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("name", FIVE)
def test_a_nan_batch_changes_nothing_and_training_goes_on(name):
    model, opt = build(name)
    for seed in (2, 3):
        opt.step(closure_for(model, *images(seed=seed)))
    before = capture(model, opt)
    moments = _moments(opt)
    x, y = images(seed=4)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(metaste.NonFiniteLossError):
        opt.step(closure_for(model, x, y))
    assert_untouched(before, model, opt)
    for a, b in zip(moments, _moments(opt)):
        assert (a is None and b is None) or torch.equal(a, b)
    for seed in (5, 6, 7):
        loss = opt.step(closure_for(model, *images(seed=seed)))
        assert math.isfinite(float(loss))
    model.eval()
    assert torch.isfinite(model(images(seed=8)[0])).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _moments(opt):
    if not isinstance(opt, metaste.JacQuant):
        return []
    return [
        None if e.quantizer.input_moment is None else e.quantizer.input_moment.clone() for e in opt.managed
    ]


class _Trainer:
    """Holds the model in a dict: the closure reaches it through an object, not a variable."""

    def __init__(self, model):
        self.parts = {"net": model}
        self.criterion = nn.CrossEntropyLoss()

    def loss(self, x, y):
        return self.criterion(self.parts["net"](x), y)


@pytest.mark.parametrize("name", FIVE)
@pytest.mark.parametrize("reach", ["variable", "container"])
def test_an_error_inside_the_closure_restores_the_batchnorm_statistics(name, reach):
    model, opt = build(name)
    opt.step(closure_for(model, *images(seed=2)))
    before = capture(model, opt)
    x, y = images(seed=3)
    trainer = _Trainer(model)

    def failing():
        if reach == "variable":
            model(x)
        else:
            trainer.loss(x, y)  # the forward ran: BN statistics moved
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(failing)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize(
    "name, release", [("analytical", "release"), ("pege", "remove"), ("jacquant", "close")]
)
def test_a_released_wrapper_refuses_to_step(name, release):
    model, opt = build(name)
    getattr(opt, release)()
    with pytest.raises(RuntimeError, match=f"{release}\\(\\) handed the model back"):
        opt.step(closure_for(model, *images(seed=2)))


@pytest.mark.parametrize("name", ["pege", "jacquant", "calibrated-probe"])
def test_a_grad_scaler_at_a_fixed_scale_in_float32_changes_nothing(name):
    """Scaling by a power of two and unscaling is exact in float32: the protocol's scaler path
    gives the unscaled run bitwise (the fp16 runs are in tests/integrations/test_grad_scaler.py)."""
    ref_model, ref = build(name)
    model, opt = build(
        name, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    )
    for t in range(3):
        x, y = images(seed=20 + t)
        ref.step(closure_for(ref_model, x, y))
        opt.step(closure_for(model, x, y))
    assert_same_state(state_of(ref_model, ref), state_of(model, opt))


def test_jacquant_storm_refuses_a_grad_scaler():
    model, opt = build("jacquant-storm", grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="two backward passes"):
        opt.step(closure_for(model, *images(seed=2)))


def test_a_wrapper_implements_update_not_step():
    with pytest.raises(TypeError, match="implement _update"):

        class Mine(OptimizerWrapper):  # noqa: F841 - defining it is the test
            def step(self, closure=None):
                return None


def _continue(model, opt, seeds):
    for s in seeds:
        opt.step(closure_for(model, *images(seed=s)))
    return state_of(model, opt)


@pytest.mark.parametrize("name", ["fogzo", "analytical", "delayed", "pege", "jacquant", "calibrated-probe"])
def test_dcp_get_and_set_state_dict_resume_the_wrapper_bitwise(name):
    """torch.distributed.checkpoint's get_state_dict / set_state_dict (one process) keep the
    wrapper's own state (in the first param group), and its state-initialising step is a no-op."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = build(name)
    _continue(model, opt, (1, 2, 3))
    msd, osd = copy.deepcopy(get_state_dict(model, opt))  # as if saved: no tensor shared with the run
    fresh_model, fresh = build(name)
    counters = copy.deepcopy(fresh.state_dict()["metaste"])
    fresh_msd, fresh_osd = get_state_dict(fresh_model, fresh)  # runs DCP's step(closure=None) at lr 0
    assert same(fresh_osd["param_groups"][0]["metaste"], counters)  # the wrapper did not step
    set_state_dict(fresh_model, fresh, model_state_dict=msd, optim_state_dict=osd)
    assert "metaste" not in fresh.param_groups[0]  # the copy does not reach the live groups
    assert_same_state(_continue(model, opt, (4, 5)), _continue(fresh_model, fresh, (4, 5)))


@pytest.mark.parametrize("name", ["analytical", "delayed", "pege", "jacquant", "calibrated"])
def test_equal_micro_batches_equal_the_one_batch_step(name):
    """A generator of two half-batch losses (each /2) gives the one-batch step to rounding:
    JacQuant's input-moment EMA moves once per step, by the micro-batches' mean. BatchNorm runs
    in eval mode (a half batch's statistics differ from the whole batch's)."""
    x, y = images(seed=30, n=16)
    runs = []
    for micro in (False, True):
        model, opt = build(name)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # batch statistics of a half batch differ from the whole batch's
        if micro:
            opt.step(lambda m=model: (F.cross_entropy(m(x[k : k + 8]), y[k : k + 8]) / 2 for k in (0, 8)))
        else:
            opt.step(closure_for(model, x, y))
        runs.append(state_of(model, opt))
    for k in runs[0]["params"]:
        torch.testing.assert_close(runs[0]["params"][k], runs[1]["params"][k], rtol=1e-5, atol=1e-6)
    for k in runs[0]["buffers"]:
        torch.testing.assert_close(runs[0]["buffers"][k], runs[1]["buffers"][k], rtol=1e-5, atol=1e-6)
