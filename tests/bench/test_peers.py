"""torchao's PARQ as registered methods: the same weights quantized as metaste's, the optimizer
stepping as torchao's own, and every evaluation on hard-quantized weights."""

import math

import pytest
import torch

pytest.importorskip("torchao.prototype.parq")

from metaste.bench import peers  # noqa: E402
from metaste.bench.compare import Protocol, Setup, check, compare  # noqa: E402
from metaste.bench.registry import METHODS, RunContext  # noqa: E402
from metaste.bench.runner import RunSpec, run_one  # noqa: E402
from metaste.bench.tasks import get_task  # noqa: E402


def _model_opt(name, bits=2, **extra):
    task = get_task("digits-mlp")
    model = task.model(0)
    ctx = RunContext(
        "sgd", 0.1, 10, 0, extra=extra, quant={"bits": bits, "quantizer": "dorefa" if bits == 1 else "lsq"}
    )
    return task, model, METHODS[name].build(model, ctx)


def _step(task, model, opt, batch):
    opt.zero_grad()
    task.loss(model, batch).backward()
    opt.step()


def test_parq_quantizes_the_weights_quantize_model_would():
    task, model, opt = _model_opt("parq-hard")
    (group,) = list(opt.regularized_param_groups())
    assert [p is model[1].weight for p in group["params"]] == [True]  # the head stays float (keep_last)
    assert peers.quantized_weight_names(model, {"bits": 2, "keep_last": False}) == ["1", "3"]


def test_parq_hard_step_is_sgd_on_the_latent_then_nearest_grid_point():
    """By hand: SGD on the latent weight, then round to UnifQuantizer's grid s·{±0.5, ±1.5},
    s = min(2·mean|w|, max|w|)/1.5, computed from the updated latent weight."""
    task, model, opt = _model_opt("parq-hard")
    batch = next(task.batches(0, 1))
    w0 = model[1].weight.detach().clone()
    model.zero_grad()
    task.loss(model, batch).backward()
    g = model[1].weight.grad.clone()
    opt.step()
    latent = w0 - 0.1 * g
    s = torch.minimum(2 * latent.abs().mean(), latent.abs().max()) / 1.5
    grid = s * torch.tensor([-1.5, -0.5, 0.5, 1.5])
    want = grid[(latent.unsqueeze(-1) - grid).abs().argmin(-1)]
    torch.testing.assert_close(model[1].weight.detach(), want)
    torch.testing.assert_close(opt.state[model[1].weight]["latent"], latent)


@pytest.mark.parametrize("name", ["parq", "parq-binaryrelax"])
def test_annealed_parq_is_hard_at_its_end_and_evaluated_hard_before(name):
    task, model, opt = _model_opt(name, anneal=0.5)
    batches = list(task.batches(0, 10))
    _step(task, model, opt, batches[0])
    _step(task, model, opt, batches[1])
    w = model[1].weight
    assert w.unique().numel() > 4  # early in the anneal: not yet on the grid
    before = w.detach().clone()
    with peers.hard_quantized(model, opt):
        assert w.unique().numel() <= 4
    assert torch.equal(w, before)  # put back bitwise
    for b in batches[2:]:
        _step(task, model, opt, b)
    assert w.unique().numel() <= 4  # anneal_end = 5 steps: hard from there on


def test_hard_quantized_before_the_first_step_uses_the_quantizer():
    task, model, opt = _model_opt("parq")
    with peers.hard_quantized(model, opt):
        assert model[1].weight.unique().numel() <= 4


def test_one_bit_parq_is_a_sign_times_mean_abs():
    task, model, opt = _model_opt("parq-hard", bits=1)
    _step(task, model, opt, next(task.batches(0, 1)))
    latent = opt.state[model[1].weight]["latent"]
    torch.testing.assert_close(model[1].weight.detach(), latent.sign() * latent.abs().mean())


@pytest.mark.parametrize(
    "task",
    [
        "digits-mlp",
        "mnist-mlp",
        pytest.param("fashion-resnet", marks=pytest.mark.slow),
        pytest.param("kjv-llama", marks=pytest.mark.slow),
    ],
)
def test_every_parq_method_runs_from_compare_on_every_task(task):
    setup = Setup(task, steps=2)
    comp = compare(setup, Protocol(list(peers.PARQ_METHODS), [0]), log=lambda _: None)
    assert {r["label"] for r in comp.runs} == set(peers.PARQ_METHODS)
    assert all(not r["diverged"] and math.isfinite(r["final_metric"]) for r in comp.runs)


def test_a_parq_run_reports_its_bits_and_is_evaluated_quantized():
    r = run_one(RunSpec("digits-mlp", "parq-hard", "parq-hard", 0, 0.1, 20, 2, "lsq"))
    assert r.bits == 2 and math.isfinite(r.final_metric)


def test_a_missing_torchao_is_named_before_anything_runs(monkeypatch):
    def missing():
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(METHODS["parq"], "available", missing)
    with pytest.raises(ValueError, match=r"pip install 'metaste\[torchao\]'|torchao"):
        check(Setup("digits-mlp"), Protocol(["ste", "parq"], [0]))


def test_the_install_command_is_in_the_error():
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *a, **kw)

    builtins.__import__ = fake
    try:
        with pytest.raises(ImportError, match=r"pip install 'metaste\[torchao\]'"):
            peers._parq()
    finally:
        builtins.__import__ = real
