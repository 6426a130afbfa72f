"""Loss scaling, accumulation and state inside a wrapper's step (docs/design.md §5.1): a loss the user
scaled is refused, ``scaler.step(wrapper)`` raises a metaste error, micro-batches equal the
one-batch step (a NaN one changes nothing), and the shared optimizer state moves to a device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaste import FOGZO, HyperSTE, NonFiniteLossError
from tests.helpers.reliability import assert_untouched, capture, closure_for, cnn, fogzo, hyper, images, mlp

# -- GradScaler ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["fogzo", "delayed"])
def test_a_gradscaler_scaled_loss_is_refused(wrapper):
    model = cnn(surrogate="ste" if wrapper == "fogzo" else "slste")
    opt = fogzo(model) if wrapper == "fogzo" else hyper(model, wrapper)
    scaler = torch.amp.GradScaler("cpu")
    x, y = images()
    before = capture(model, opt)
    with pytest.raises(ValueError, match="GradScaler"):
        opt.step(lambda: scaler.scale(F.cross_entropy(model(x), y)))
    assert_untouched(before, model, opt)


def test_scaler_step_on_a_wrapper_raises_a_metaste_error():
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


def test_a_loss_multiplied_by_a_python_number_is_not_mistaken_for_a_scaled_one():
    model = cnn()
    opt = fogzo(model)
    x, y = images()
    opt.step(lambda: F.cross_entropy(model(x), y) * 1024.0)
    opt.step(lambda: F.cross_entropy(model(x), y) * torch.tensor(3.0))


# -- gradient accumulation: the closure yields micro-batch losses ------------------------------


def _micro(model, x, y, k):
    return lambda: (
        F.cross_entropy(model(xs), ys) * (len(ys) / len(y)) for xs, ys in zip(x.split(k), y.split(k))
    )


@pytest.mark.parametrize("wrapper", ["ste", "fogzo", "analytical", "delayed"])
def test_micro_batch_accumulation_equals_the_one_batch_step(wrapper):
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


def test_each_micro_batch_graph_is_freed_before_the_next_forward():
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


def test_a_nan_micro_batch_changes_nothing():
    model = cnn()
    opt = fogzo(model)
    x, y = images(n=16)
    x[12, 0, 0, 0] = float("nan")
    before = capture(model, opt)
    with pytest.raises(NonFiniteLossError, match="micro-batch 3"):
        opt.step(lambda: (F.cross_entropy(model(xs), ys) / 4 for xs, ys in zip(x.split(4), y.split(4))))
    assert_untouched(before, model, opt)
    assert all(p.grad is None for p in model.parameters())


# -- the shared optimizer state holds tensors only ---------


@pytest.mark.parametrize("wrapper", ["fogzo", "delayed", "analytical"])
def test_the_move_state_to_a_device_loop_works(wrapper):
    model = cnn(surrogate="ste" if wrapper == "fogzo" else "slste")
    opt = fogzo(model) if wrapper == "fogzo" else hyper(model, wrapper)
    for s in range(3):
        opt.step(closure_for(model, *images(seed=s)))
    for st in opt.state.values():
        for k, v in st.items():
            st[k] = v.to("cpu")  # every value is a tensor
    assert "fogzo_step" not in str(opt.state) and "fogzo_fallbacks" not in str(opt.state)
