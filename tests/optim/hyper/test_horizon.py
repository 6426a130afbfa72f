"""HyperSTE horizon methods fagu / pfagu / lgatt (docs/design.md §3.3–3.5) and diffopt.differentiable_step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import HyperSTE
from metaste.optim.hyper.horizon_memory import HorizonMemoryError
from tests.helpers.hyperste import (
    OPTIMIZERS,
    WARMUP,
    SmoothSLSTEQuantizer,
    batches,
    clone_run,
    loss_fn,
    quantized_mlp,
    set_surrogate_params,
    warmed_up_smooth_model,
)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


def _smooth_setup(name, n):
    """Smooth stand-in model (docs/design.md §3.5) after WARMUP bare steps, and n more batches."""
    cls, kw = OPTIMIZERS[name]
    data = _data(WARMUP + n)
    return warmed_up_smooth_model(cls, kw, data)


def _horizon_hypergradient(model, opt, steps, extra, method, **kw):
    """The hypergradient of one horizon (replays=1, θ left unchanged), shape [T, *θ.shape]."""
    m, o = clone_run(model, opt)
    h_opt = HyperSTE(
        o,
        method=method,
        model=m,
        horizon=len(steps),
        replays=1,
        last="extra_carry",
        hyper_lr=0.0,
        hyper_lr_mode="raw",
        **kw,
    )
    h_opt.run_horizon([lambda x=x, y=y: loss_fn(m, x, y) for x, y in steps], extra=lambda: loss_fn(m, *extra))
    return h_opt.method.hypergrad[0]


def _final_loss(model, opt, steps, extra, thetas):
    """L_T on ``extra`` after the steps, where step t's backward (only) uses θ_t = thetas[t]."""
    m, o = clone_run(model, opt)
    q = m[0].weight_quant
    for (x, y), theta in zip(steps, thetas):
        with torch.no_grad():
            q.surrogate.a.copy_(theta)
        o.zero_grad()
        loss_fn(m, x, y).backward()
        o.step()
    with torch.no_grad():
        return float(loss_fn(m, *extra))


def _check_against_finite_differences(model, opt, steps, extra, h, rel):
    theta = model[0].weight_quant.surrogate.a.clone()
    g = torch.Generator().manual_seed(7)
    eps = 1e-6
    for j in range(len(steps)):
        d = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        thetas = [theta.clone() for _ in steps]
        thetas[j] = theta + eps * d
        lp = _final_loss(model, opt, steps, extra, thetas)
        thetas[j] = theta - eps * d
        lm = _final_loss(model, opt, steps, extra, thetas)
        fd = (lp - lm) / (2 * eps)
        assert abs(fd) > 1e-8  # the check is not vacuous
        assert float((h[j] * d).sum()) == pytest.approx(fd, rel=rel, abs=1e-10)


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam"])
def test_fagu_one_step_hypergradient_matches_central_finite_differences(name):
    model, opt, data = _smooth_setup(name, 2)
    h = _horizon_hypergradient(model, opt, data[:1], data[1], "fagu")
    assert h.shape == (1,) + model[0].weight.shape
    _check_against_finite_differences(model, opt, data[:1], data[1], h, rel=1e-4)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_lgatt_equals_fagu_for_one_step(name):
    model, opt, data = _smooth_setup(name, 2)
    h_fagu = _horizon_hypergradient(model, opt, data[:1], data[1], "fagu")
    h_lgatt = _horizon_hypergradient(model, opt, data[:1], data[1], "lgatt")
    assert h_fagu.abs().max() > 0
    torch.testing.assert_close(h_lgatt, h_fagu, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam"])
def test_lgatt_exact_matches_finite_differences_of_the_final_loss(name):
    """T = 3: ∂L_3/∂θ_j for every j through the whole trajectory (all parameters, optimizer state)."""
    model, opt, data = _smooth_setup(name, 4)
    h = _horizon_hypergradient(model, opt, data[:3], data[3], "lgatt")
    assert h.shape == (3,) + model[0].weight.shape
    _check_against_finite_differences(model, opt, data[:3], data[3], h, rel=1e-4)
    # and it is not FAGU's greedy hypergradient (which only sees L_{t+1})
    h_fagu = _horizon_hypergradient(model, opt, data[:3], data[3], "fagu")
    assert not torch.allclose(h[0], h_fagu[0], rtol=1e-3)


class _Elementwise(nn.Module):
    """y = x ⊙ Ψ(v): a loss Σ (x_i v̂_i − y_i)² has a diagonal Hessian in v."""

    def __init__(self, n):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(0.3 * torch.randn(n, generator=g, dtype=torch.float64))
        self.weight_quant = SmoothSLSTEQuantizer(self.weight, s=0.25)
        theta = 0.6 + torch.rand(n, generator=g, dtype=torch.float64)
        with torch.no_grad():
            self.weight_quant.surrogate.a.copy_(theta)
        self.weight_quant.a_forward = theta.clone()
        metaste.quant.register(self.weight, self.weight_quant)

    def forward(self, x):
        return x * self.weight_quant(self.weight)


def test_lgatt_diag_equals_exact_when_the_hessian_is_diagonal():
    model = _Elementwise(12)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 12, generator=g))
        for _ in range(4)
    ]

    def run(hessian):
        m = copy.deepcopy(model)
        m.weight_quant.a_forward = model.weight_quant.a_forward
        metaste.quant.register(m.weight, m.weight_quant)
        opt = HyperSTE(
            torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=0.01),
            method="lgatt",
            model=m,
            horizon=3,
            replays=1,
            last="extra_carry",
            hyper_lr=0.0,
            hessian=hessian,
        )
        closures = [lambda x=x, y=y: ((m(x) - y.double()) ** 2).sum(1).mean() for x, y in data[:3]]
        opt.run_horizon(closures, extra=lambda: ((m(data[3][0]) - data[3][1].double()) ** 2).sum(1).mean())
        return opt.method.hypergrad[0]

    exact, diag = run("exact"), run("diag")
    assert exact.abs().max() > 0
    torch.testing.assert_close(diag, exact, rtol=1e-10, atol=1e-14)


class _DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.mid(self.body(x))))


def _loader(seed):
    xs, ys = zip(*batches(6, size=8))
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(
        ds, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def test_replays_are_bitwise_deterministic_with_dropout_bn_and_shuffled_data():
    """hyper_lr = 0: every replay and the final pass run the same schedule, so their step losses
    equal the user's pass bitwise, and the result equals the bare optimizer's run."""
    torch.manual_seed(0)
    model = metaste.quantize_model(_DropNet(), bits=2, surrogate="slste")
    ref_model = copy.deepcopy(model)
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        method="fagu",
        model=model,
        horizon_epochs=1,
        steps_per_epoch=_loader(0),
        replays=3,
        hyper_lr=0.0,
    )
    torch.manual_seed(5)
    losses = [float(opt.step(lambda x=x, y=y: loss_fn(model, x, y))) for x, y in _loader(3)]
    m = opt.method
    assert len(losses) == m.opts.horizon == 4
    assert m.losses[0] == losses
    assert m.losses[1] == losses and m.losses[2] == losses and m.final_losses == losses
    after_user_rng = torch.get_rng_state()
    # the bare optimizer, same RNG stream: the same losses and weights, bitwise
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(5)
    ref_losses = []
    for x, y in _loader(3):
        ref_opt.zero_grad()
        loss = loss_fn(ref_model, x, y)
        loss.backward()
        ref_opt.step()
        ref_losses.append(float(loss.detach()))
    assert ref_losses == losses
    assert torch.equal(after_user_rng, torch.get_rng_state())  # K does not change the user's stream
    for (n, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("method", ["fagu", "lgatt"])
def test_user_loop_gets_the_replay0_losses_and_model_holds_the_final_pass(method):
    model = quantized_mlp()
    set_surrogate_params(model, 0.7, 1.3)
    ref = copy.deepcopy(model)  # quantizers not deferred: ψ in their backward
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        method=method,
        model=model,
        horizon=3,
        replays=2,
        hyper_lr=0.05,
    )
    data = batches(3)
    theta0 = [s.clone() for s in opt.method.schedule]
    losses = [float(opt.step(lambda x=x, y=y: loss_fn(model, x, y))) for x, y in data]
    thetaK = [s.clone() for s in opt.method.schedule]
    assert any(not torch.equal(a, b) for a, b in zip(theta0, thetaK))  # θ was learned

    def run(schedule):
        m = copy.deepcopy(ref)
        o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        out = []
        for t, (x, y) in enumerate(data):
            with torch.no_grad():
                for (_, buf), s in zip(metaste.surrogate_parameters(m), schedule):
                    buf.copy_(s[min(t, 1)])  # last="carry": step 2 uses row 1
            o.zero_grad()
            loss = loss_fn(m, x, y)
            loss.backward()
            o.step()
            out.append(float(loss.detach()))
        return m, out

    _, ref_losses = run(theta0)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    final_model, final_losses = run(thetaK)
    assert opt.method.final_losses == pytest.approx(final_losses, rel=1e-6)
    for p, q in zip(model.parameters(), final_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_memory_budget_error_is_clear_and_changes_nothing():
    model = quantized_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="lgatt",
        model=model,
        horizon=50,
        memory_budget=1e5,
    )
    x, y = torch.randn(4096, 10), torch.randint(0, 3, (4096,))  # 160 kB captured per closure
    with pytest.raises(HorizonMemoryError, match=r"T=50 steps needs about .* MiB .*batches .*memory_budget"):
        opt.step(lambda: loss_fn(model, x, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    est = opt.method.memory_estimate
    assert est["batches"] >= 50 * (x.numel() * 4 + y.numel() * 8)
    n_params = sum(p.numel() * 4 for p in model.parameters())
    assert est["trace"] >= 50 * n_params  # T × |x|


@pytest.mark.parametrize("method,opt_name", [("fagu", "adam"), ("pfagu", "sgd_momentum"), ("lgatt", "adam")])
def test_state_dict_resume_mid_horizon_is_exact(method, opt_name):
    cls, kw = OPTIMIZERS[opt_name]
    data = batches(7)

    def build():
        m = quantized_mlp()
        o = HyperSTE(cls(m.parameters(), **kw), method=method, model=m, horizon=3, replays=2, hyper_lr=0.05)
        return m, o

    m_a, o_a = build()
    for x, y in data:
        o_a.step(lambda x=x, y=y: loss_fn(m_a, x, y))
    m_b, o_b = build()
    for x, y in data[:5]:  # mid second horizon: 2 of its 3 steps done
        o_b.step(lambda x=x, y=y: loss_fn(m_b, x, y))
    saved = copy.deepcopy((m_b.state_dict(), o_b.state_dict()))
    m_c, o_c = build()
    m_c.load_state_dict(saved[0])
    o_c.load_state_dict(saved[1])
    with pytest.raises(RuntimeError, match="resume_horizon"):
        o_c.step(lambda: loss_fn(m_c, *data[5]))
    o_c.resume_horizon([lambda x=x, y=y: loss_fn(m_c, x, y) for x, y in data[3:5]])
    for x, y in data[5:]:
        o_c.step(lambda x=x, y=y: loss_fn(m_c, x, y))
    for (n, a), b in zip(m_a.state_dict().items(), m_c.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(o_a.method.schedule, o_c.method.schedule):
        assert torch.equal(a, b)
    assert o_a.method.losses == o_c.method.losses


def test_schedule_rules_last_step_shared_and_warm_start():
    data = batches(6)

    def run(**kw):
        m = quantized_mlp()
        o = HyperSTE(torch.optim.SGD(m.parameters(), lr=0.1), method="fagu", model=m, hyper_lr=0.05, **kw)
        snaps = []
        for t, (x, y) in enumerate(data):
            o.step(lambda x=x, y=y: loss_fn(m, x, y))
            if t % 3 == 2:
                snaps.append([s.clone() for s in o.method.schedule])
        return o, snaps

    o, (s1, s2) = run(horizon=3, replays=2, last="carry")
    assert s1[0].shape[0] == 3 and torch.equal(s1[0][2], s1[0][1]) and not torch.equal(s1[0][1], s1[0][0])
    o, (s1, _) = run(horizon=3, replays=2, last="ste")
    assert torch.equal(s1[0][2], torch.ones_like(s1[0][2]))
    o, (s1, _) = run(horizon=3, replays=2, last="extra_ste")
    assert not torch.equal(s1[0][2], torch.ones_like(s1[0][2]))  # θ_{T−1} is learned too
    o, (s1, s2) = run(horizon=3, replays=1, schedule="shared")
    assert s1[0].shape[0] == 1
    # warm start: the second horizon moves on from the first one's schedule; without: from a = 1
    _, (w1, w2) = run(horizon=3, replays=1, warm_start=True)
    _, (c1, c2) = run(horizon=3, replays=1, warm_start=False)
    assert torch.equal(w1[0], c1[0])
    assert (w2[0] - 1).abs().max() > (c2[0] - 1).abs().max()


def test_pfagu_defaults_and_horizon_in_epochs():
    model = quantized_mlp()
    loader = _loader(0)
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="pfagu",
        model=model,
        horizon_epochs=2,
        steps_per_epoch=loader,
    )
    h = opt.method.opts
    assert (h.horizon, h.replays, h.schedule, h.last) == (2 * len(loader), 5, "shared", "carry")
    assert opt.diagnostics["horizon"]["T"] == 8


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="fagu"), "exactly one of horizon"),
        (dict(method="fagu", horizon=0), "Invalid horizon"),
        (dict(method="fagu", horizon=1, last="carry"), "leaves nothing to learn"),
        (dict(method="fagu", horizon=3, last="final"), "Invalid last"),
        (dict(method="fagu", horizon=3, schedule="per_epoch"), "Invalid schedule"),
        (dict(method="fagu", horizon=3, replays=0), "Invalid replays"),
        (dict(method="lgatt", horizon=3, boundary="window"), "boundary='window' is not available"),
        (dict(method="lgatt", horizon=3, hessian="diag", momentum=True), "SGD without momentum"),
        (dict(method="fagu", horizon=3, memory_budget=-1), "Invalid memory_budget"),
        (dict(method="fagu", horizon=3, no_model=True), "needs model="),
    ],
)
def test_bad_horizon_arguments_raise_and_change_nothing(kw, match):
    model = quantized_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if kw.pop("momentum", False) else 0.0)
    model_kw = {} if kw.pop("no_model", False) else {"model": model}
    with pytest.raises(ValueError, match=match):
        HyperSTE(opt, **model_kw, **kw)
    assert all(not e.quantizer.defer_surrogate for _, e in metaste.quantized_weights(model))


def test_recalibrate_hook_run_horizon_and_diagnostics():
    calls = []
    model = quantized_mlp()
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="pfagu",
        model=model,
        horizon=2,
        replays=2,
        recalibrate=calls.append,
    )
    data = batches(4)
    opt.step(lambda: loss_fn(model, *data[0]))
    with pytest.raises(RuntimeError, match="middle of a horizon"):
        opt.run_horizon([lambda: loss_fn(model, *data[2])] * 2)
    opt.step(lambda: loss_fn(model, *data[1]))
    with pytest.raises(ValueError, match="T=2"):
        opt.run_horizon([lambda: loss_fn(model, *data[2])])
    losses = opt.run_horizon([lambda x=x, y=y: loss_fn(model, x, y) for x, y in data[2:]])
    assert len(losses) == 2 and opt.steps == 4
    assert calls == [model, model]  # once per horizon
    d = opt.diagnostics
    assert d["method"] == "pfagu" and d["horizon"]["horizons_done"] == 2
    assert len(d["horizon"]["replay_mean_loss"]) == 2 and d["horizon"]["final_mean_loss"] is not None
    assert d["hypergrad_norm"] > 0 and d["horizon"]["memory_estimate"]["total"] > 0


def test_a_diverging_replay_rolls_back_its_schedule_and_the_final_pass_runs():
    model = quantized_mlp()
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1), method="fagu", model=model, horizon=2, replays=3
    )
    data, calls = batches(2), [0]

    def closure(x, y):
        calls[0] += 1
        loss = loss_fn(model, x, y)
        return loss * float("nan") if calls[0] == 4 else loss  # replay 1's second step

    theta0 = opt.method.schedule[0].clone()
    for x, y in data:
        opt.step(lambda x=x, y=y: closure(x, y))
    m = opt.method
    assert m.nonfinite == 1 and len(m.losses) == 1  # replay 1 stopped, no replay 2
    assert torch.equal(m.schedule[0], theta0)  # back to θ^0, the last schedule with a finite run
    assert len(m.final_losses) == 2 and all(math.isfinite(v) for v in m.final_losses)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
