"""torch.compile: FOGZO and HyperSTE over ``torch.compile(model, fullgraph=True)`` and
``model.compile(fullgraph=True)`` (fullgraph: any graph break raises), a bounded number of
compilations over many steps (no recompilation per step), equal to eager; the closure's modules
are found without hooks (docs/design.md §10.5)."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

import metaste
from metaste import FOGZO, HyperSTE
from metaste.optim.core.modules import captured_modules
from tests.helpers.integration import batches

STEPS = 6


def bn_mlp(surrogate="identity"):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    return metaste.quantize_model(net, bits=2, surrogate=surrogate)


MAKERS = {
    "fogzo": ("identity", lambda p: FOGZO(torch.optim.SGD(p, lr=0.1, momentum=0.9), total_steps=STEPS, n=2)),
    "delayed": ("slste", lambda p: HyperSTE(torch.optim.Adam(p, lr=1e-2), method="delayed", hyper_lr=0.05)),
}


def run(method, how, backend):
    surrogate, make = MAKERS[method]
    model = bn_mlp(surrogate)
    opt = make(model.parameters())
    if how == "function":
        fwd = torch.compile(model, backend=backend, fullgraph=True)
    elif how == "method":
        model.compile(backend=backend, fullgraph=True)
        fwd = model
    else:
        fwd = model
    losses, frames = [], []
    for x, y in batches(STEPS):
        losses.append(opt.step(lambda x=x, y=y: F.cross_entropy(fwd(x), y)).item())
        frames.append(getattr(backend, "frame_count", 0))
    return losses, model, frames


@pytest.mark.parametrize("how", ["function", "method"])
@pytest.mark.parametrize("method", list(MAKERS))
def test_compiled_model_has_one_graph_per_grad_mode_and_equals_eager(method, how):
    torch._dynamo.reset()
    counter = CompileCounter()  # runs the captured graphs as they are: bitwise comparable to eager
    losses, model, frames = run(method, how, counter)
    ref_losses, ref_model, _ = run(method, "eager", None)
    assert losses == ref_losses
    for (k, v), (_, r) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(v, r), k  # running statistics included: only the clean pass updated them
    # compiled in the first step (FOGZO: with and without grad), never again
    assert frames[0] >= 1 and frames[-1] == frames[0]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
def test_fogzo_with_the_inductor_backend_runs_without_graph_breaks():
    torch._dynamo.reset()
    losses, _, _ = run("fogzo", "function", "inductor")
    ref_losses, _, _ = run("fogzo", "eager", None)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)


model_at_module_level = nn.Linear(2, 2)


def test_captured_modules_finds_the_model_however_the_closure_holds_it():
    model, other = bn_mlp(), nn.Linear(3, 3)
    x = torch.randn(4, 10)

    class Holder:
        def __init__(self):
            self.model = model

        def loss(self, x):
            return self.model(x).sum()

    def loss_of(m, x):
        return m(x).sum()

    assert captured_modules(lambda: model(x).sum()) == [model]  # a cell
    assert captured_modules(lambda m=model: m(x).sum()) == [model]  # a default
    assert captured_modules(functools.partial(loss_of, model, x)) == [model]
    assert captured_modules(functools.partial(Holder().loss, x)) == [model]  # a bound method's object
    assert captured_modules(lambda: model_at_module_level(x)) == [model_at_module_level]  # a global
    compiled = torch.compile(model)
    assert captured_modules(lambda: compiled(x).sum()) == [compiled]  # its buffers are the model's
    acc = metaste.Accumulated([lambda: model(x).sum(), lambda: other(x).sum()])
    assert {id(m) for m in captured_modules(acc)} == {id(model), id(other)}
    assert captured_modules(lambda: model[0](x).sum() + model(x).sum()) == [model]  # submodule dropped
