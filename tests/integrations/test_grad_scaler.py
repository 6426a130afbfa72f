"""fp16 with a torch.amp.GradScaler inside the wrappers (docs/design.md §5.1), on CPU: plain-STE
settings equal a hand-written fp16 loop with the same scaler step for step (skipped overflow
steps included), an overflow step changes nothing but the scale, gradients are unscaled before
the estimators, clipping and per-micro-batch accumulation."""

from __future__ import annotations

import copy

import pytest
import torch

import metaste
from metaste import FOGZO, Accumulated, HyperSTE
from tests.helpers.integration import assert_same_tensors, batches, loss_fn, mlp, nested_equal, tensors_of

STEPS = 20


def fp16(model, x, y):
    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return loss_fn(model, x, y)

    return closure


def scaler(init_scale=2.0**20, growth_interval=3):
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)


# (surrogate of the model, base optimizer, wrapper in its plain-STE setting)
PLAIN = {
    "fogzo": (
        "ste",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        dict(ste_fraction=1.0, total_steps=STEPS),
    ),
    "analytical": ("slste", lambda p: torch.optim.SGD(p, lr=0.1), dict(method="analytical", hyper_lr=0.0)),
    "delayed": ("slste", lambda p: torch.optim.Adam(p, lr=1e-2), dict(method="delayed", hyper_lr=0.0)),
}


def make(name, **extra):
    surrogate, base, kwargs = PLAIN[name]
    model = mlp(surrogate=surrogate)
    cls = FOGZO if name == "fogzo" else HyperSTE
    return model, cls(base(model.parameters()), **kwargs, **extra)


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_ste_wrappers_equal_a_hand_written_fp16_loop_with_the_same_scaler(name):
    data = batches(STEPS)
    surrogate, base, _ = PLAIN[name]
    ref_model = mlp(surrogate=surrogate)
    ref_opt, ref_scaler = base(ref_model.parameters()), scaler()
    ref_losses, ref_scales = [], []
    for x, y in data:
        ref_opt.zero_grad(set_to_none=True)
        loss = fp16(ref_model, x, y)()
        ref_scaler.scale(loss).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_losses.append(loss.item())
        ref_scales.append(ref_scaler.get_scale())

    sc = scaler()
    model, opt = make(name, grad_scaler=sc)
    losses, scales, skipped = [], [], []
    for x, y in data:
        losses.append(opt.step(fp16(model, x, y)).item())
        scales.append(sc.get_scale())
        skipped.append(opt.last_step_skipped)

    assert any(skipped) and not all(skipped)  # the sequence has overflow steps and real ones
    assert losses == ref_losses
    assert scales == ref_scales
    assert_same_tensors(tensors_of(model), tensors_of(ref_model))


OVERFLOW = {
    "fogzo": (
        "identity",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        FOGZO,
        dict(total_steps=50, n=2),
    ),
    "analytical": ("slste", lambda p: torch.optim.SGD(p, lr=0.1), HyperSTE, dict(method="analytical")),
    "delayed": (
        "slste",
        lambda p: torch.optim.Adam(p, lr=1e-2),
        HyperSTE,
        dict(method="delayed", window=3, accumulate="sum", hyper_optimizer="adam"),
    ),
}


@pytest.mark.parametrize("name", list(OVERFLOW))
def test_an_overflow_step_changes_nothing_but_the_scale(name):
    surrogate, base, cls, kwargs = OVERFLOW[name]
    model = mlp(surrogate=surrogate)
    sc = scaler(init_scale=2.0**8, growth_interval=1000)
    opt = cls(base(model.parameters()), grad_scaler=sc, **kwargs)
    data = batches(5)
    for x, y in data[:4]:  # history, pending windows, FOGZO's counters: all non-trivial
        opt.step(fp16(model, x, y))
        assert not opt.last_step_skipped
    before_model, before_opt = tensors_of(model), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    sc.update(new_scale=2.0**40)  # fp16 activations' gradients overflow at this scale
    calls = []
    x, y = data[4]
    closure = fp16(model, x, y)
    loss = opt.step(lambda: calls.append(1) or closure())
    assert opt.last_step_skipped and torch.isfinite(loss)
    assert len(calls) == 1  # no perturbed passes, no replays
    assert sc.get_scale() == 2.0**39  # backoff, as GradScaler.update after a skipped step
    assert_same_tensors(tensors_of(model), before_model)
    assert nested_equal(opt.state_dict(), before_opt)
    assert torch.equal(torch.get_rng_state(), rng)  # the closure drew nothing here; FOGZO drew nothing
    # and the next step at a sane scale proceeds normally
    sc.update(new_scale=2.0**8)
    opt.step(closure)
    assert not opt.last_step_skipped
    assert not torch.equal(tensors_of(model)[next(iter(before_model))], next(iter(before_model.values())))


@pytest.mark.parametrize("name", ["fogzo", "analytical"])
def test_gradients_are_unscaled_before_the_estimator(name):
    """In float32 a power-of-two scale is exact: with the scaler the run equals the run without it.
    FOGZO's unmanaged biases and the raw-mode analytical c = η·g·g⁻·d⁻ would both see the scale."""
    surrogate, base, cls, kwargs = OVERFLOW[name]
    if name == "analytical":
        kwargs = dict(kwargs, hyper_lr=1e3, hyper_lr_mode="raw")
    runs = []
    for sc in (None, scaler(init_scale=2.0**12, growth_interval=2)):
        model = mlp(surrogate=surrogate)
        opt = cls(base(model.parameters()), grad_scaler=sc, **kwargs)
        losses = [opt.step(lambda m=model, x=x, y=y: loss_fn(m, x, y)).item() for x, y in batches(6)]
        runs.append((losses, tensors_of(model)))
    assert runs[0][0] == runs[1][0]
    assert_same_tensors(runs[0][1], runs[1][1])
    if name == "analytical":
        assert any(not torch.equal(t, torch.ones_like(t)) for _, t in metaste.surrogate_parameters(model))


def test_horizon_methods_refuse_a_scaler():
    model = mlp()
    with pytest.raises(ValueError, match="per-step methods"):
        HyperSTE(
            torch.optim.SGD(model.parameters(), lr=0.1),
            method="fagu",
            horizon=2,
            model=model,
            grad_scaler=scaler(),
        )


def test_a_non_scaler_is_rejected():
    model = mlp()
    with pytest.raises(TypeError, match="GradScaler"):
        FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5, grad_scaler=object())
    with pytest.raises(ValueError, match="max_grad_norm"):
        FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5, max_grad_norm=0.0)


@pytest.mark.parametrize("name", list(PLAIN))
def test_max_grad_norm_equals_clip_grad_norm_before_the_base_step(name):
    data = batches(5)
    surrogate, base, _ = PLAIN[name]
    ref_model = mlp(surrogate=surrogate)
    ref_opt = base(ref_model.parameters())
    norms = []
    for x, y in data:
        ref_opt.zero_grad(set_to_none=True)
        loss_fn(ref_model, x, y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), 0.05))
        ref_opt.step()
    model, opt = make(name, max_grad_norm=0.05)
    for (x, y), n in zip(data, norms):
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))
        assert torch.equal(opt.last_grad_norm, n)
    assert max(norms) > 0.05  # the clip acted
    assert_same_tensors(tensors_of(model), tensors_of(ref_model))


def test_fogzo_clips_the_backprop_gradient_not_its_estimate():
    data = batches(1)
    x, y = data[0]
    runs = []
    for clip in (None, 1e-3):
        model = mlp(surrogate="identity")
        opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5, n=2, max_grad_norm=clip)
        ref = mlp(surrogate="identity")
        loss_fn(ref, x, y).backward()
        backprop_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        opt.step(lambda m=model: loss_fn(m, x, y))
        if clip is not None:
            assert torch.equal(opt.last_grad_norm, backprop_norm)
        runs.append(model)
    managed = {id(e.weight) for _, e in metaste.quantized_weights(runs[0])}
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        # G does not depend on the scale of g (ĝ is normalised): managed weights move as unclipped
        same = torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        assert same if id(p) in managed else not same


@pytest.mark.parametrize("name", ["fogzo", "delayed"])
def test_accumulated_micro_batches_equal_one_closure_over_their_mean(name):
    surrogate, base, cls, kwargs = OVERFLOW[name]
    data = batches(8, size=8)
    runs = []
    for accumulate in (False, True):
        model = mlp(surrogate=surrogate)
        opt = cls(base(model.parameters()), **kwargs)
        losses = []
        for k in range(0, 8, 4):
            micro = data[k : k + 4]
            if accumulate:
                closure = Accumulated([lambda m=model, x=x, y=y: loss_fn(m, x, y) for x, y in micro])
            else:
                closure = lambda m=model, micro=micro: sum(loss_fn(m, x, y) for x, y in micro) / len(micro)  # noqa: E731
            losses.append(opt.step(closure).item())
        runs.append((losses, tensors_of(model)))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-6, atol=0)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-5, atol=1e-6)


def test_accumulated_backward_runs_per_micro_batch_under_no_sync():
    model = mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="analytical")
    events = []

    class NoSync:
        def __enter__(self):
            events.append("no_sync")

        def __exit__(self, *a):
            pass

    def part(x, y):
        def c():
            events.append("forward")
            return loss_fn(model, x, y)

        return c

    acc = Accumulated([part(x, y) for x, y in batches(3)], weights=[1, 1, 1], no_sync=NoSync)
    opt.step(acc)
    assert events == ["no_sync", "forward", "no_sync", "forward", "forward"]
    assert len(acc) == 3


@pytest.mark.parametrize("name", ["analytical", "delayed"])
def test_torch_fp16_loop_with_scaler_step_on_a_one_forward_wrapper_equals_the_bare_loop(name):
    """``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` — torch's own fp16 loop
    — drives a wrapper that needs one forward (overflow skips included)."""
    data = batches(STEPS)
    surrogate, base, _ = PLAIN[name]
    runs = []
    for wrapped in (False, True):
        model = mlp(surrogate=surrogate)
        opt = base(model.parameters())
        if wrapped:
            opt = HyperSTE(opt, **PLAIN[name][2])
        s = scaler()
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            s.scale(fp16(model, x, y)()).backward()
            s.step(opt)
            s.update()
        runs.append((tensors_of(model), s.get_scale()))
    assert runs[0][1] == runs[1][1] and runs[0][1] < 2.0**20  # the same overflow skips happened
    assert_same_tensors(runs[0][0], runs[1][0])
