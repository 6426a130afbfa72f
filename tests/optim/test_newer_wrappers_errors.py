"""PEGE and JacQuant after a non-finite batch: the step raises, and weights, optimizer state,
BatchNorm statistics and JacQuant's input-moment statistics are as they were, so training goes on
from where it was (before, the BN statistics and JacQuant's moments kept the NaN)."""

import math

import pytest
import torch
import torch.nn.functional as F
from _reliability_helpers import assert_untouched, capture, closure_for, cnn, images

import metaste


def _build(kind):
    model = cnn()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "pege":
        return model, metaste.PEGE(base, total_steps=50, model=model)
    return model, metaste.JacQuant(base, every=1)


def _moments(opt):
    return [
        None if e.quantizer.input_moment is None else e.quantizer.input_moment.clone() for e in opt.managed
    ]


@pytest.mark.parametrize("kind", ["pege", "jacquant"])
def test_a_nan_batch_changes_nothing_and_training_goes_on(kind):
    model, opt = _build(kind)
    for seed in (2, 3):
        opt.step(closure_for(model, *images(seed=seed)))
    before = capture(model, opt)
    moments = _moments(opt) if kind == "jacquant" else None
    x, y = images(seed=4)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(metaste.NonFiniteLossError):
        opt.step(closure_for(model, x, y))
    assert_untouched(before, model, opt)
    if moments is not None:
        for a, b in zip(moments, _moments(opt)):
            assert (a is None and b is None) or torch.equal(a, b)
    for seed in (5, 6, 7):
        loss = opt.step(closure_for(model, *images(seed=seed)))
        assert math.isfinite(float(loss))
    model.eval()
    assert torch.isfinite(model(images(seed=8)[0])).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["pege", "jacquant"])
def test_an_error_inside_the_closure_restores_the_batchnorm_statistics(kind):
    model, opt = _build(kind)
    opt.step(closure_for(model, *images(seed=2)))
    before = capture(model, opt)
    x, y = images(seed=3)

    def failing():
        F.cross_entropy(model(x), y)  # the forward ran: BN statistics moved
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(failing)
    assert_untouched(before, model, opt)
