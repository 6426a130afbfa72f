"""HyperSTE wrapper conventions (docs/design.md §5): bit-identity when switched off, validation, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import metaste
from metaste import HyperSTE
from tests.helpers.hyperste import batches, loss_fn, mlp, quantized_mlp
from tests.helpers.optim_db import optim_db_cases


def _bare_run(cls, kw, data, surrogate="slste"):
    model = quantized_mlp(surrogate=surrogate)
    opt = cls(model.parameters(), **copy.deepcopy(kw))
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model


DB_CLASSES = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


@pytest.mark.parametrize("cls,kw", optim_db_cases(DB_CLASSES))
def test_hyper_lr_zero_is_bit_identical_to_the_bare_optimizer(cls, kw):
    data = batches(5)
    ref = _bare_run(cls, kw, data)
    plain_sgd = cls is torch.optim.SGD and not kw.get("momentum") and not kw.get("maximize")
    methods = ["delayed"] + (["analytical"] if plain_sgd else [])
    for method in methods:
        model = quantized_mlp()
        window = {"window": 2} if method == "delayed" else {}
        opt = HyperSTE(cls(model.parameters(), **copy.deepcopy(kw)), method=method, hyper_lr=0.0, **window)
        for x, y in data:
            opt.step(lambda x=x, y=y, m=model: loss_fn(m, x, y))
        for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(p, q), (method, n)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed_nothing(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for _, e in metaste.quantized_weights(model):
        assert e.quantizer.defer_surrogate is False
        assert getattr(e.surrogate, "boundary", "none") == "none"


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda m: HyperSTE(torch.optim.Adam(m.parameters())), "needs torch.optim.SGD.*delayed"),
        (
            lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
            "without momentum.*delayed",
        ),
        (lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), method="delayed", window=1), "window"),
        (lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), hyper_lr=-1.0), "hyper_lr"),
        (lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), hyper_lr=float("nan")), "hyper_lr"),
        (lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), method="fancy"), "Unknown method"),
        (lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), resolve="x"), "resolve"),
        (
            lambda m: HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), method="delayed", accumulate="x"),
            "accumulate",
        ),
    ],
)
def test_bad_input_raises_a_clear_error_and_changes_nothing(build, match):
    model = quantized_mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        build(model)
    _changed_nothing(model, before)


@pytest.mark.parametrize(
    "kw,method,bad",
    [
        (dict(method="delayed", resolve="halve"), "delayed", "resolve"),
        (dict(method="delayed", resolve="threshold"), "delayed", "resolve"),
        (dict(method="analytical", window=5), "analytical", "window"),
        (dict(accumulate="sum"), "analytical", "accumulate"),
        (dict(hyper_optimizer=torch.optim.Adam), "analytical", "hyper_optimizer"),
        (dict(method="fagu", horizon=3, window=7), "fagu", "window"),
        (dict(method="delayed", horizon=3), "delayed", "horizon"),
        (dict(method="fagu", horizon=3, hessian="diag"), "fagu", "hessian"),
        (dict(method="pfagu", horizon=3, seed=1), "pfagu", "seed"),
    ],
)
def test_an_option_the_method_does_not_use_raises_type_error_naming_the_method_and_its_options(
    kw, method, bad
):
    model = quantized_mlp()
    before = _snapshot(model)
    with pytest.raises(
        TypeError, match=rf"method='{method}' does not take {bad}; its options are hyper_lr, "
    ):
        HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **kw)
    _changed_nothing(model, before)


def test_an_options_object_equals_the_keyword_shorthand_and_refuses_extra_keywords():
    from metaste.optim.hyper import Delayed

    data = batches(6)
    runs = []
    for method in (Delayed(window=3, hyper_optimizer="adam", hyper_lr=0.05), "delayed"):
        model = quantized_mlp(surrogate="plste")
        kw = (
            {}
            if not isinstance(method, str)
            else dict(window=3, hyper_optimizer=torch.optim.Adam, hyper_lr=0.05)
        )
        opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **kw)
        assert isinstance(opt.method.hyper_opt, torch.optim.Adam)
        for x, y in data:
            opt.step(lambda x=x, y=y, m=model: loss_fn(m, x, y))
        runs.append(model.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    with pytest.raises(TypeError, match="put them in the options object"):
        HyperSTE(torch.optim.SGD(quantized_mlp().parameters(), lr=0.1), method=Delayed(), window=3)
    with pytest.raises(ValueError, match="Unknown hyper_optimizer 'adamm'"):
        Delayed(hyper_optimizer="adamm")


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_analytical_with_coarse_granularity_raises(granularity):
    model = quantized_mlp(granularity=granularity)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="granularity='element'.*delayed"):
        HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1))
    _changed_nothing(model, before)


@pytest.mark.parametrize(
    "model_fn", [lambda: mlp(), lambda: metaste.quantize_model(mlp(), bits=2, surrogate="ste")]
)
def test_model_without_learnable_surrogate_raises(model_fn):
    model = model_fn()
    with pytest.raises(ValueError, match="no quantized weight with a learnable surrogate"):
        HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="delayed")


def test_a_weight_cannot_be_managed_twice_and_release_hands_psi_back():
    model = quantized_mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already driven by a HyperSTE"):
        HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.release()
    assert all(not e.quantizer.defer_surrogate for _, e in metaste.quantized_weights(model))
    HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize(
    "method,cls,kw",
    [
        ("delayed", torch.optim.Adam, dict(window=3, accumulate="sum", hyper_optimizer=torch.optim.Adam)),
        ("delayed", torch.optim.SGD, dict(window=2)),
        ("analytical", torch.optim.SGD, dict()),
    ],
)
@pytest.mark.parametrize("split", [1, 4])
def test_state_dict_resume_mid_window_equals_the_unsplit_run_bitwise(method, cls, kw, split):
    data = batches(7)
    lr = 0.01 if cls is torch.optim.Adam else 0.1

    def build():
        m = quantized_mlp(surrogate="slste")
        return m, HyperSTE(cls(m.parameters(), lr=lr), method=method, hyper_lr=0.05, **kw)

    m_ref, o_ref = build()
    for x, y in data:
        o_ref.step(lambda x=x, y=y: loss_fn(m_ref, x, y))
    m1, o1 = build()
    for x, y in data[:split]:
        o1.step(lambda x=x, y=y: loss_fn(m1, x, y))
    ckpt = _roundtrip({"model": m1.state_dict(), "opt": o1.state_dict()})
    o1.release()
    m2, o2 = build()
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    for x, y in data[split:]:
        o2.step(lambda x=x, y=y: loss_fn(m2, x, y))
    for (n, p), (_, q) in zip(m2.state_dict().items(), m_ref.state_dict().items()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(t, torch.ones_like(t)) for _, t in metaste.surrogate_parameters(m_ref))


def test_loading_a_state_dict_of_another_method_raises():
    m = quantized_mlp()
    sd = HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), method="delayed").state_dict()
    m2 = quantized_mlp()
    with pytest.raises(ValueError, match="method='delayed'"):
        HyperSTE(torch.optim.SGD(m2.parameters(), lr=0.1)).load_state_dict(copy.deepcopy(sd))


@pytest.mark.parametrize("method", ["analytical", "delayed"])
def test_gradient_accumulation_over_micro_batches_gives_the_same_a_as_one_big_batch(method):
    """The closure loops over micro-batches and returns their mean loss: the rule sees the summed
    gradient (ψ applied after backward), as for one big batch."""
    data = batches(4, size=32, dtype=torch.float64)
    results = []
    for micro in (1, 4):
        model = quantized_mlp(dtype=torch.float64)
        opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.2), method=method, hyper_lr=0.05)
        for x, y in data:

            def closure(x=x, y=y, m=model, k=micro):
                return sum(loss_fn(m, xb, yb) for xb, yb in zip(x.chunk(k), y.chunk(k))) / k

            opt.step(closure)
        results.append([t.clone() for _, t in metaste.surrogate_parameters(model)])
    assert not all(torch.equal(t, torch.ones_like(t)) for t in results[0])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
