"""HF Accelerate with metaste wrappers (metaste.integrations.accelerate.prepare): with
gradient_accumulation_steps, a prepared scheduler and bf16, the run equals the plain metaste loop
over the same windows; what plain accelerator.prepare does instead; bad set-ups."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.integration import assert_same_tensors, batches, loss_fn, mlp, tensors_of

accelerate = pytest.importorskip("accelerate", reason="needs the [hf] extra: pip install 'metaste[hf]'")

import metaste  # noqa: E402
from metaste.integrations.accelerate import prepare  # noqa: E402

MICRO = 12

METHODS = {
    "fogzo": ("identity", lambda p: metaste.FOGZO(torch.optim.SGD(p, lr=0.1, momentum=0.9), total_steps=6)),
    "delayed": (
        "slste",
        lambda p: metaste.HyperSTE(torch.optim.Adam(p, lr=1e-2), method="delayed", window=2),
    ),
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    accelerate.state.AcceleratorState._reset_state(True)
    accelerate.state.GradientState._reset_state()


def schedule(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def plain_loop(method, data, ga, bf16, scaler=None, mult=1.0):
    model = mlp(surrogate=METHODS[method][0])
    opt = METHODS[method][1](model.parameters())
    opt.grad_scaler = scaler
    sched = schedule(opt)
    losses = []

    def micro_loss(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return mult * loss_fn(model, x, y)

    for k in range(0, len(data), ga):
        closures = [lambda x=x, y=y: micro_loss(x, y) for x, y in data[k : k + ga]]
        losses.append(opt.step(metaste.Accumulated(closures, weights=[1 / ga] * len(closures))).item())
        if not opt.last_step_skipped:
            sched.step()
    return losses, model


@pytest.mark.parametrize("method,ga,bf16", [("fogzo", 3, False), ("delayed", 2, False), ("fogzo", 2, True)])
def test_prepared_wrapper_with_gradient_accumulation_equals_the_plain_loop(method, ga, bf16):
    data = batches(MICRO)
    ref_losses, ref_model = plain_loop(method, data, ga, bf16)

    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_steps=ga, mixed_precision="bf16" if bf16 else "no"
    )
    model = mlp(surrogate=METHODS[method][0])
    opt = METHODS[method][1](model.parameters())
    model, opt, sched = prepare(accelerator, model, opt, schedule(opt))
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=None))
    losses = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = opt.step(lambda x=x, y=y: loss_fn(model, x, y))
            sched.step()
        if loss is not None:
            losses.append(loss.item())
    assert losses == ref_losses
    assert_same_tensors(tensors_of(accelerator.unwrap_model(model)), tensors_of(ref_model))
    lr0 = 0.1 if method == "fogzo" else 1e-2
    assert opt.metaste_optimizer.param_groups[0]["lr"] < lr0  # the prepared scheduler stepped per window


def test_the_accelerators_grad_scaler_goes_to_the_wrapper_and_overflow_skips_the_schedule():
    """accelerate allows fp16 on GPUs only; here its scaler is set by hand on CPU (fp32 compute, a
    scale so large that the first windows overflow)."""
    mk = lambda: torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=2)  # noqa: E731
    data = batches(MICRO)
    ref_losses, ref_model = plain_loop("delayed", data, 2, False, scaler=mk(), mult=16.0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    accelerator.scaler = scaler = mk()
    model = mlp(surrogate="slste")
    opt = METHODS["delayed"][1](model.parameters())
    model, opt, sched = prepare(accelerator, model, opt, schedule(opt))
    losses, skipped = [], []
    for x, y in data:
        with accelerator.accumulate(model):
            loss = opt.step(lambda x=x, y=y: 16.0 * loss_fn(model, x, y))
            sched.step()
        if loss is not None:
            losses.append(loss.item())
            skipped.append(accelerator.optimizer_step_was_skipped)
    assert opt.metaste_optimizer.grad_scaler is scaler
    assert any(skipped) and not all(skipped)
    assert losses == ref_losses
    assert_same_tensors(tensors_of(model), tensors_of(ref_model))


def test_plain_accelerator_prepare_drops_the_accumulated_micro_batches():
    """Why prepare() exists for the methods that need a closure: AcceleratedOptimizer.step(closure)
    only runs the window's last closure."""
    data = batches(4)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp(surrogate="identity")
    model, opt = accelerator.prepare(model, METHODS["fogzo"][1](model.parameters()))
    calls = []
    for i, (x, y) in enumerate(data):
        with accelerator.accumulate(model):
            opt.step(lambda i=i, x=x, y=y: calls.append(i) or loss_fn(model, x, y))
    assert 0 not in calls and 2 not in calls  # micro-batches 0 and 2 never reached the wrapper


@pytest.mark.parametrize("method", ["delayed", "pege"])
def test_plain_accelerator_prepare_with_the_torch_loop_drives_a_one_forward_wrapper(method):
    """No adapter: ``accelerator.backward(loss); opt.step(); opt.zero_grad()`` inside
    ``accumulate`` equals the wrapper stepped on the window's accumulated gradients."""
    builders = {
        "delayed": METHODS["delayed"],
        "pege": ("identity", lambda p: metaste.PEGE(torch.optim.SGD(p, lr=0.1, momentum=0.9), total_steps=6)),
    }
    surrogate, make = builders[method]
    data, ga = batches(8), 2
    ref_model = mlp(surrogate=surrogate)
    ref = make(ref_model.parameters())
    for k in range(0, len(data), ga):
        for x, y in data[k : k + ga]:
            (loss_fn(ref_model, x, y) / ga).backward()
        ref.step()
        ref.zero_grad()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ga)
    model = mlp(surrogate=surrogate)
    model, opt = accelerator.prepare(model, make(model.parameters()))
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, x, y))
            opt.step()
            opt.zero_grad()
    assert opt.optimizer.steps == len(data) // ga
    got, want = tensors_of(model), tensors_of(ref_model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_a_closure_that_does_not_bind_its_batch_is_named():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp(surrogate="identity")
    model, opt = prepare(accelerator, model, METHODS["fogzo"][1](model.parameters()))
    with pytest.raises(ValueError, match=r"captured 'x', 'y'.*lambda x=x, y=y"):
        for x, y in batches(2):
            with accelerator.accumulate(model):
                opt.step(lambda: loss_fn(model, x, y))  # noqa: B023 - the mistake under test


def test_bad_setups_are_refused():
    accelerator = accelerate.Accelerator(cpu=True)
    model = mlp(surrogate="identity")
    with pytest.raises(TypeError, match="no metaste optimizer wrapper.*Supported"):
        prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
    model, opt = prepare(accelerator, model, METHODS["fogzo"][1](model.parameters()))
    with pytest.raises(TypeError, match="steps on a closure"):
        opt.step()
