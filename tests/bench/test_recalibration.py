"""Every evaluation re-estimates BatchNorm on fixed training batches with the weights the model
has now, and leaves the run it measures untouched."""

import dataclasses

import pytest
import torch
from torch import nn

from metaste.bench import data
from metaste.bench.tasks import ClassificationTask
from metaste.quant.bn import recalibrate_bn
from metaste.quant.convert import quantize_model


def _task(**kw):
    return ClassificationTask(
        "digits-bn",
        "digits, MLP with BatchNorm",
        lambda: nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)),
        optimizer="sgd",
        lr=0.1,
        steps=20,
        batch_size=32,
        metric="accuracy",
        load=data.load_digits,
        **kw,
    )


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_evaluation_does_not_depend_on_the_training_statistics():
    task = _task()
    model = quantize_model(task.model(0), bits=2)
    clean = task.evaluate(model)
    bn = model[1]
    bn.running_mean.fill_(5.0), bn.running_var.fill_(100.0)  # statistics from another model
    assert task.evaluate(model) == clean
    assert dataclasses.replace(task, calibration_batches=0).evaluate(model) != clean  # without it, they count


def test_evaluation_leaves_every_buffer_as_it_was():
    task = _task()
    model = quantize_model(task.model(0), bits=2)
    model.train()
    for batch in task.batches(0, 3):
        task.loss(model, batch).backward()
    before = _buffers(model)
    task.evaluate(model), task.validation_loss(model)
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_the_statistics_inside_equal_recalibrate_bn_on_the_fixed_batches():
    task = _task(calibration_batches=7)
    model = quantize_model(task.model(0), bits=2)
    reference = quantize_model(task.model(0), bits=2)
    reference.load_state_dict(model.state_dict())
    recalibrate_bn(reference, task.batches(-7_777, 7))
    with task.recalibrated(model):
        got = _buffers(model)
    want = _buffers(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with task.recalibrated(model, holdout=True):  # tuning: the calibration rows leave the validation part out
        assert not torch.equal(model[1].running_mean, want["1.running_mean"])


def test_keep_leaves_the_recalibrated_statistics():
    task = _task()
    model = quantize_model(task.model(0), bits=2)
    with task.recalibrated(model, keep=True):
        inside = _buffers(model)
    assert all(torch.equal(v, _buffers(model)[k]) for k, v in inside.items())


def test_a_model_without_batchnorm_is_left_alone():
    task = _task()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with task.recalibrated(model):
        pass
    assert list(model.buffers()) == []


@pytest.mark.parametrize("holdout", [False, True])
def test_an_error_inside_restores_the_statistics(holdout):
    task = _task()
    model = quantize_model(task.model(0), bits=2)
    before = _buffers(model)
    with pytest.raises(RuntimeError, match="boom"), task.recalibrated(model, holdout=holdout):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in _buffers(model).items())
