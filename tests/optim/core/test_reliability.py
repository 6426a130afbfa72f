"""The wrapper defects a new user hit, one test (or a few) per numbered defect; each
failed before its fix. The quantization-substrate defects are in tests/quant/test_quant_reliability.py,
the bad-input matrix in tests/test_bad_input.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import FOGZO, HyperSTE, NonFiniteLossError
from tests.helpers.reliability import assert_untouched, capture, closure_for, cnn, fogzo, hyper, images, mlp

# -- 1. an error in step() leaves the buffers (BN statistics, activation quantizer) as they were ----


@pytest.mark.parametrize("wrapper", ["fogzo", "analytical", "delayed"])
def test_1_nan_batch_leaves_batchnorm_and_everything_else_untouched(wrapper):
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


def test_1_an_error_in_the_first_step_leaves_the_activation_quantizer_uninitialised():
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


def test_1_an_error_raised_by_the_closure_after_the_forward_restores_the_buffers():
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


# -- 3. resume × LR scheduler is bitwise, for every method --------------------------------------


def _resume_case(kind):
    def make():
        surrogate = "ste" if kind == "fogzo" else "slste"
        model = cnn(surrogate=surrogate)
        if kind == "fogzo":
            opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=6)
        elif kind == "analytical":
            opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="analytical", hyper_lr=0.05)
        elif kind == "delayed":
            base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            opt = HyperSTE(base, method="delayed", window=2, hyper_lr=0.05)
        else:
            base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            opt = HyperSTE(base, method="fagu", model=model, horizon=2, replays=2, hyper_lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return model, opt, sched

    return make


@pytest.mark.parametrize("kind", ["fogzo", "analytical", "delayed", "fagu"])
def test_3_resume_with_an_lr_scheduler_is_bitwise(kind, tmp_path):
    make = _resume_case(kind)
    data = [images(seed=s) for s in range(6)]
    whole, opt, sched = make()
    for x, y in data:
        opt.step(closure_for(whole, x, y))
        sched.step()

    first, opt, sched = make()
    for x, y in data[:4]:
        opt.step(closure_for(first, x, y))
        sched.step()
    torch.save(
        {"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        tmp_path / "ck.pt",
    )
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    second, opt, sched = make()
    second.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    for x, y in data[4:]:
        opt.step(closure_for(second, x, y))
        sched.step()
    for (n, a), b in zip(whole.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), n


# -- 4. / 15. load_state_dict validates the whole dict first; a failed load changes nothing -------


def test_4_hyperste_refuses_a_fogzo_state_dict_and_changes_nothing():
    m1, m2 = cnn(), cnn(surrogate="slste")
    f = fogzo(m1)
    f.step(closure_for(m1, *images()))
    h = hyper(m2, "delayed")
    h.step(closure_for(m2, *images(seed=2)))
    before = capture(m2, h)
    with pytest.raises(ValueError, match="saved by FOGZO, not by HyperSTE"):
        h.load_state_dict(f.state_dict())
    assert_untouched(before, m2, h)
    h.step(closure_for(m2, *images(seed=3)))  # still works


def test_4_fogzo_refuses_a_hyperste_state_dict_and_its_next_step_works():
    m1, m2 = cnn(surrogate="slste"), cnn()
    h = hyper(m1, "delayed")
    h.step(closure_for(m1, *images()))
    f = fogzo(m2)
    f.step(closure_for(m2, *images(seed=2)))
    before = capture(m2, f)
    with pytest.raises(ValueError, match="saved by HyperSTE, not by FOGZO"):
        f.load_state_dict(h.state_dict())
    assert_untouched(before, m2, f)
    f.step(closure_for(m2, *images(seed=3)))


def test_4_a_state_dict_over_another_base_optimizer_is_refused():
    m1, m2 = cnn(), cnn()
    a = FOGZO(torch.optim.Adam(m1.parameters()), total_steps=10)
    a.step(closure_for(m1, *images()))
    b = fogzo(m2)
    with pytest.raises(ValueError, match="torch.optim.Adam"):
        b.load_state_dict(a.state_dict())


def test_4_a_failing_wrapper_load_rolls_the_base_optimizer_back():
    m1, m2 = cnn(surrogate="slste"), cnn(surrogate="slste")
    a, b = hyper(m1, "delayed"), hyper(m2, "delayed")
    for opt, m in ((a, m1), (b, m2)):
        opt.step(closure_for(m, *images()))
    a.step(closure_for(m1, *images(seed=5)))
    sd = a.state_dict()
    del sd["metaste"]["method"]["hyper_opt"]  # a damaged checkpoint: found only while loading
    before = capture(m2, b)
    with pytest.raises(KeyError):
        b.load_state_dict(sd)
    assert_untouched(before, m2, b)
    assert b.state is b.optimizer.state and b.param_groups is b.optimizer.param_groups


@pytest.mark.parametrize(
    "saved, now, match",
    [
        (dict(n=2), dict(n=1), r"n=2 \(constructor: 1\)"),
        (dict(seed=3), dict(seed=0), r"seed=3 \(constructor: 0\)"),
        (dict(total_steps=50), dict(total_steps=100), "total_steps=50"),
    ],
)
def test_15_fogzo_settings_of_the_checkpoint_must_match_the_constructor(saved, now, match):
    m1, m2 = cnn(), cnn()
    a, b = fogzo(m1, **saved), fogzo(m2, **now)
    a.step(closure_for(m1, *images()))
    before = capture(m2, b)
    with pytest.raises(ValueError, match=match):
        b.load_state_dict(a.state_dict())
    assert_untouched(before, m2, b)
    fogzo(cnn(), **saved).load_state_dict(a.state_dict())  # the same settings load


def test_15_delayed_window_of_the_checkpoint_must_match_the_constructor():
    m1, m2 = cnn(surrogate="slste"), cnn(surrogate="slste")
    a, b = hyper(m1, "delayed", window=3), hyper(m2, "delayed", window=2)
    a.step(closure_for(m1, *images()))
    before = capture(m2, b)
    with pytest.raises(ValueError, match=r"window=3 \(constructor: 2\)"):
        b.load_state_dict(a.state_dict())
    assert_untouched(before, m2, b)


# -- 5. FOGZO with every managed weight frozen ----------------------------------------------------


def test_5_fogzo_with_every_weight_frozen_after_construction_is_a_clear_error():
    model = cnn()
    opt = fogzo(model)
    for p in model.parameters():
        p.requires_grad_(False)
    before = capture(model, opt)
    with pytest.raises(ValueError, match="frozen"):
        opt.step(closure_for(model, *images()))
    assert_untouched(before, model, opt)


def test_5_fogzo_over_frozen_weights_says_they_are_frozen():
    model = cnn()
    for _, e in metaste.quantized_weights(model):
        e.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        fogzo(model)


# -- 9. HyperSTE refuses bf16 latents like FOGZO and quantize_model --------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_9_reduced_precision_latents_are_refused_by_both_wrappers(dtype):
    model = cnn(surrogate="slste").to(dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        hyper(model, "delayed")
    with pytest.raises(TypeError, match=str(dtype)):
        fogzo(model)


# -- 10. analytical checks momentum at step time ---------------------------------------------------


@pytest.mark.parametrize("change", [("momentum", 0.9), ("nesterov", True), ("maximize", True)])
def test_10_analytical_refuses_momentum_switched_on_after_construction(change):
    model = cnn(surrogate="slste")
    opt = hyper(model, "analytical")
    opt.step(closure_for(model, *images()))
    opt.param_groups[0][change[0]] = change[1]
    before = capture(model, opt)
    with pytest.raises(ValueError, match=change[0]):
        opt.step(closure_for(model, *images(seed=2)))
    assert_untouched(before, model, opt)


# -- 11. scales= with a callable that returns None (torchao before its first forward) ---------------


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


def test_11_a_scale_that_is_none_is_read_after_the_first_forward():
    torch.manual_seed(0)
    m = _LazyScaled()
    opt = FOGZO(
        torch.optim.SGD(m.parameters(), lr=0.1), total_steps=10, scales={m.lin.weight: lambda: m.scale}
    )
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    w0 = m.lin.weight.detach().clone()
    opt.step(lambda: F.cross_entropy(m(x), y))
    assert not torch.equal(w0, m.lin.weight)


def test_11_a_scale_that_stays_none_names_the_weight():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    opt = FOGZO(torch.optim.SGD(lin.parameters(), lr=0.1), total_steps=10, scales={lin.weight: lambda: None})
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(4, 12\)\).*not initialised"):
        opt.step(lambda: F.cross_entropy(lin(x), y))
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


# -- 12. GradScaler ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["fogzo", "delayed"])
def test_12_a_gradscaler_scaled_loss_is_refused(wrapper):
    model = cnn(surrogate="ste" if wrapper == "fogzo" else "slste")
    opt = fogzo(model) if wrapper == "fogzo" else hyper(model, wrapper)
    scaler = torch.amp.GradScaler("cpu")
    x, y = images()
    before = capture(model, opt)
    with pytest.raises(ValueError, match="GradScaler"):
        opt.step(lambda: scaler.scale(F.cross_entropy(model(x), y)))
    assert_untouched(before, model, opt)


def test_12_scaler_step_on_a_wrapper_raises_a_metaste_error():
    model = cnn()
    opt = fogzo(model)
    x, y = images()
    before = capture(model, opt)
    for scaler in (torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu", enabled=False)):
        with pytest.raises(RuntimeError, match=r"opt.step\(closure\)"):
            scaler.step(opt, closure_for(model, x, y))
    assert_untouched(before, model, opt)
    # a bare optimizer still goes through the scaler as usual
    bare = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(bare)
    scaler.update()


def test_12_a_loss_multiplied_by_a_python_number_is_not_mistaken_for_a_scaled_one():
    model = cnn()
    opt = fogzo(model)
    x, y = images()
    opt.step(lambda: F.cross_entropy(model(x), y) * 1024.0)
    opt.step(lambda: F.cross_entropy(model(x), y) * torch.tensor(3.0))


# -- 13. gradient accumulation: the closure yields micro-batch losses ------------------------------


def _micro(model, x, y, k):
    return lambda: (
        F.cross_entropy(model(xs), ys) * (len(ys) / len(y)) for xs, ys in zip(x.split(k), y.split(k))
    )


@pytest.mark.parametrize("wrapper", ["ste", "fogzo", "analytical", "delayed"])
def test_13_micro_batch_accumulation_equals_the_one_batch_step(wrapper):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    results = []
    for accumulate in (False, True):
        model = mlp(surrogate="ste" if wrapper in ("ste", "fogzo") else "slste")
        if wrapper in ("ste", "fogzo"):
            base = torch.optim.SGD(model.parameters(), lr=0.5)
            opt = FOGZO(base, total_steps=1, ste_fraction=1.0 if wrapper == "ste" else 0.0)
        else:
            opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.5), method=wrapper, hyper_lr=0.05)
        closure = _micro(model, x, y, 8) if accumulate else closure_for(model, x, y)
        losses = [float(opt.step(closure)) for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (l1, p1), (l2, p2) = results
    assert l1 == pytest.approx(l2, abs=1e-6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_13_each_micro_batch_graph_is_freed_before_the_next_forward():
    """The wrapper runs backward on each yielded loss before asking for the next one."""
    model = mlp()
    opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1, ste_fraction=1.0)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    seen = []

    def micro():
        for xs, ys in zip(x.split(4), y.split(4)):
            seen.append(model[0].weight.grad is not None)
            yield F.cross_entropy(model(xs), ys) / 4

    opt.step(micro)
    assert seen == [False, True, True, True]


def test_13_a_nan_micro_batch_changes_nothing():
    model = cnn()
    opt = fogzo(model)
    x, y = images(n=16)
    x[12, 0, 0, 0] = float("nan")
    before = capture(model, opt)
    with pytest.raises(NonFiniteLossError, match="micro-batch 3"):
        opt.step(lambda: (F.cross_entropy(model(xs), ys) / 4 for xs, ys in zip(x.split(4), y.split(4))))
    assert_untouched(before, model, opt)
    assert all(p.grad is None for p in model.parameters())


# -- 14. the shared optimizer state holds tensors only (fixed by the wrapper-state nesting) ---------


@pytest.mark.parametrize("wrapper", ["fogzo", "delayed", "analytical"])
def test_14_the_move_state_to_a_device_loop_works(wrapper):
    model = cnn(surrogate="ste" if wrapper == "fogzo" else "slste")
    opt = fogzo(model) if wrapper == "fogzo" else hyper(model, wrapper)
    for s in range(3):
        opt.step(closure_for(model, *images(seed=s)))
    for st in opt.state.values():
        for k, v in st.items():
            st[k] = v.to("cpu")  # every value is a tensor
    assert "fogzo_step" not in str(opt.state) and "fogzo_fallbacks" not in str(opt.state)


# -- 16. a closure over another model: warn once ----------------------------------------------------


@pytest.mark.parametrize("wrapper", ["fogzo", "delayed"])
def test_16_a_loss_that_reaches_no_managed_weight_warns_once(wrapper):
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


# -- 17. FOGZO: a learned step size that runs away is reported ------------------------------------


def test_17_a_step_size_that_grows_by_an_order_of_magnitude_warns_and_shows_in_the_diagnostics():
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
