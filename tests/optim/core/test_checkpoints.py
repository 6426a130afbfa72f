"""Wrapper checkpoints (docs/design.md §5): a resume under an LR scheduler continues bitwise for
every method, and ``load_state_dict`` validates the whole dict first (another wrapper's, another
base optimizer's, other settings): a refused load changes nothing."""

from __future__ import annotations

import pytest
import torch

from metaste import FOGZO, HyperSTE
from tests.helpers.reliability import assert_untouched, capture, closure_for, cnn, fogzo, hyper, images

# -- resume × LR scheduler is bitwise, for every method --------------------------------------


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
def test_resume_with_an_lr_scheduler_is_bitwise(kind, tmp_path):
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


# -- load_state_dict validates the whole dict first; a failed load changes nothing -------


def test_hyperste_refuses_a_fogzo_state_dict_and_changes_nothing():
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


def test_fogzo_refuses_a_hyperste_state_dict_and_its_next_step_works():
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


def test_a_state_dict_over_another_base_optimizer_is_refused():
    m1, m2 = cnn(), cnn()
    a = FOGZO(torch.optim.Adam(m1.parameters()), total_steps=10)
    a.step(closure_for(m1, *images()))
    b = fogzo(m2)
    with pytest.raises(ValueError, match="torch.optim.Adam"):
        b.load_state_dict(a.state_dict())


def test_a_failing_wrapper_load_rolls_the_base_optimizer_back():
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
def test_fogzo_settings_of_the_checkpoint_must_match_the_constructor(saved, now, match):
    m1, m2 = cnn(), cnn()
    a, b = fogzo(m1, **saved), fogzo(m2, **now)
    a.step(closure_for(m1, *images()))
    before = capture(m2, b)
    with pytest.raises(ValueError, match=match):
        b.load_state_dict(a.state_dict())
    assert_untouched(before, m2, b)
    fogzo(cnn(), **saved).load_state_dict(a.state_dict())  # the same settings load


def test_delayed_window_of_the_checkpoint_must_match_the_constructor():
    m1, m2 = cnn(surrogate="slste"), cnn(surrogate="slste")
    a, b = hyper(m1, "delayed", window=3), hyper(m2, "delayed", window=2)
    a.step(closure_for(m1, *images()))
    before = capture(m2, b)
    with pytest.raises(ValueError, match=r"window=3 \(constructor: 2\)"):
        b.load_state_dict(a.state_dict())
    assert_untouched(before, m2, b)
