"""The FOGZO wrapper (docs/design.md §4): restore, RNG and buffers, closure calls, checkpoints,
bit-identity with the bare optimizer, validation, scales=, DDP. The estimate itself:
test_fogzo_estimate.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import FOGZO
from metaste.optim.core.closure import NonFiniteLossError
from tests.helpers.ddp import spawn_ranks
from tests.helpers.fogzo import batch, closure_for, mlp, params_equal
from tests.helpers.optim_db import optim_db_cases
from tests.helpers.reliability import same

# -- restore, buffers, RNG, closure calls ---------------------------------------------------


def test_copy_restore_is_bitwise_and_inplace_drift_stays_within_4_ulp_per_cycle():
    """lr = 0: "copy" restores bitwise; "inplace" (+1, −2, +1) drifts by ≤ 4 ulp of max|v| per
    tensor after one cycle, and the drift of many cycles is a random walk (≤ 4·√cycles ulp)."""
    x, y = batch()
    for restore, steps in (("copy", 100), ("inplace", 1), ("inplace", 100)):
        model = mlp(quantizer="lsq", per_channel=True)
        before = [p.detach().clone() for p in model.parameters()]
        opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.0), n=2, restore=restore, total_steps=100)
        for _ in range(steps):
            opt.step(closure_for(model, x, y))
        for p, p0 in zip(model.parameters(), before):
            if restore == "copy":
                assert torch.equal(p, p0)
            else:
                ulp = torch.finfo(p.dtype).eps * float(p0.abs().max())
                assert float((p.detach() - p0).abs().max()) <= 4 * ulp * math.sqrt(2 * steps)


def test_inplace_restore_after_a_failed_pass_is_within_4_ulp_and_the_rest_is_untouched():
    """The default in-place restore cannot be bitwise: a perturbed pass that raises leaves each
    weight within 4 ulp of its tensor's max|v| (one cycle); buffers and optimizer state are exact."""
    x, y = batch()
    model = mlp(quantizer="lsq", per_channel=True, bn=True)
    opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), n=2, total_steps=10)
    opt.step(closure_for(model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    state = copy.deepcopy(opt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        if len(calls) == 3:  # the second perturbed pass: the weights are at v − ε⊙d_1
            raise RuntimeError("perturbed pass failed")
        return loss

    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        opt.step(closure)
    assert opt.restore == "inplace"
    for p, p0 in zip(model.parameters(), params):
        ulp = torch.finfo(p.dtype).eps * float(p0.abs().max())
        assert float((p.detach() - p0).abs().max()) <= 4 * ulp
    assert all(torch.equal(b, b0) for b, b0 in zip(model.buffers(), buffers))
    assert same(opt.state_dict(), state)


def test_buffers_rng_and_closure_calls_match_a_plain_ste_step():
    x, y = batch()
    a, b = mlp(bn=True, drop=0.3), mlp(bn=True, drop=0.3)
    b.load_state_dict(a.state_dict())
    masks, calls = [], [0]

    def closure():
        calls[0] += 1
        masks.append(torch.rand(3))  # the RNG state each pass starts from
        assert a.training
        return F.cross_entropy(a(x), y)

    opt = FOGZO(torch.optim.SGD(a.parameters(), lr=0.0), n=2, total_steps=10)
    torch.manual_seed(123)
    opt.step(closure)
    after_fogzo = torch.rand(4)
    torch.manual_seed(123)
    torch.rand(3)
    F.cross_entropy(b(x), y).backward()
    after_ste = torch.rand(4)
    assert calls[0] == 5 and all(torch.equal(m, masks[0]) for m in masks)
    assert torch.equal(after_fogzo, after_ste)
    for ba, bb in zip(a.buffers(), b.buffers()):
        assert torch.equal(ba, bb)


@pytest.mark.parametrize("n,one_sided,expected", [(1, False, 3), (3, False, 7), (3, True, 4)])
def test_closure_call_count(n, one_sided, expected):
    model = mlp()
    x, y = batch()
    calls = [0]

    def closure():
        calls[0] += 1
        return F.cross_entropy(model(x), y)

    opt = FOGZO(
        torch.optim.SGD(model.parameters(), lr=0.1),
        n=n,
        one_sided=one_sided,
        total_steps=10,
        ste_fraction=0.2,
    )
    counts = []
    for _ in range(4):
        calls[0] = 0
        opt.step(closure)
        counts.append(calls[0])
    assert counts == [1, 1, expected, expected]


def test_unmanaged_parameters_keep_their_backprop_gradient():
    x, y = batch()
    a, b = mlp(quantizer="lsq"), mlp(quantizer="lsq")
    FOGZO(torch.optim.SGD(a.parameters(), lr=0.0), total_steps=10).step(closure_for(a, x, y))
    F.cross_entropy(b(x), y).backward()
    managed = {id(p) for p in a.parameters() if metaste.quant.lookup(p) is not None}
    for p, q in zip(a.parameters(), b.parameters()):
        if id(p) not in managed:
            assert torch.equal(p.grad, q.grad)
        else:
            assert not torch.equal(p.grad, q.grad)


def test_non_finite_perturbed_loss_keeps_g_counts_and_warns_once():
    model, ref = mlp(), mlp()
    x, y = batch()
    calls = [0]

    def closure():
        calls[0] += 1
        loss = F.cross_entropy(model(x), y)
        return loss if calls[0] % 3 == 1 else loss * float("inf")

    opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, restore="copy")
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    assert params_equal(model, ref)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert opt.fallbacks == 2


# -- checkpoints ---------------------------------------------------------------------------


def test_resume_from_state_dict_continues_the_trajectory_bitwise(tmp_path):
    def make(model, seed):
        return FOGZO(torch.optim.Adam(model.parameters(), lr=0.01), total_steps=8, seed=seed, n=2)

    data = [batch(seed=t) for t in range(8)]
    whole = mlp()
    opt = make(whole, 4)
    for x, y in data:
        opt.step(closure_for(whole, x, y))

    first = mlp()
    opt = make(first, 4)
    for x, y in data[:3]:
        opt.step(closure_for(first, x, y))
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    second = mlp(seed=99)
    second.load_state_dict(ck["model"])
    with pytest.raises(ValueError, match=r"seed=4 \(constructor: 0\)"):
        make(second, 0).load_state_dict(ck["opt"])  # a different seed: raises, nothing loaded
    opt = make(second, 4)
    opt.load_state_dict(ck["opt"])
    assert opt.steps == 3 and opt.seed == 4
    for x, y in data[3:]:
        opt.step(closure_for(second, x, y))
    assert params_equal(whole, second)


def test_fogzo_keeps_only_per_parameter_tensors_in_the_shared_state():
    """The base optimizer's ``state`` holds nothing of FOGZO's: the usual "move every state
    tensor to a device" loop works, and the step/fallback counters live under state_dict()["metaste"]."""
    model = mlp(quantizer="lsq")
    opt = FOGZO(torch.optim.Adam(model.parameters(), lr=1e-3), total_steps=10)
    x, y = batch(seed=0)
    for _ in range(2):
        opt.step(closure_for(model, x, y))
    assert all(isinstance(k, torch.Tensor) for k in opt.state)
    for st in opt.state.values():
        for v in st.values():
            v.to("cpu")  # every value is a tensor (Adam's step, exp_avg, exp_avg_sq)
    sd = opt.state_dict()
    assert (sd["metaste"]["steps"], sd["metaste"]["fallbacks"]) == (2, 0)


# -- bit-identity with the bare optimizer (docs/design.md §4.4, §5) --------------------------------------


@pytest.mark.parametrize("cls,kwargs", optim_db_cases((torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)))
def test_ste_fraction_one_is_bit_identical_to_the_bare_optimizer(cls, kwargs):
    a, b = mlp(quantizer="lsq"), mlp(quantizer="lsq")
    opt = FOGZO(cls(a.parameters(), **copy.deepcopy(kwargs)), ste_fraction=1.0, total_steps=4)
    bare = cls(b.parameters(), **copy.deepcopy(kwargs))
    for t in range(4):
        x, y = batch(seed=t)
        opt.step(closure_for(a, x, y))
        bare.zero_grad()
        F.cross_entropy(b(x), y).backward()
        bare.step()
    assert params_equal(a, b)


# -- bad input: a clear error and untouched weights --------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=0, total_steps=5), "Invalid n"),
        (dict(beta_min=1.5, total_steps=5), "Invalid beta_min"),
        (dict(beta_min=-0.1, total_steps=5), "Invalid beta_min"),
        (dict(beta_min=0.99), "total_steps is required"),
        (dict(), "total_steps is required"),
        (dict(ste_fraction=0.5, beta_min=1.0), "total_steps is required"),
        (dict(restore="swap", total_steps=5), "Invalid restore"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_no_managed_parameters_and_bf16_latents_are_rejected():
    plain = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="quantize_model.*scales="):
        FOGZO(torch.optim.SGD(plain.parameters(), lr=0.1), total_steps=5)
    model = mlp().to(torch.bfloat16)  # held: the registry forgets weights of a deleted model
    with pytest.raises(TypeError, match="bfloat16"):
        FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5)


@pytest.mark.parametrize(
    "make_closure,error",
    [
        (lambda m, x, y: None, ValueError),
        (lambda m, x, y: lambda: 1.0, TypeError),
        (lambda m, x, y: lambda: F.cross_entropy(m(x), y, reduction="none"), ValueError),
        (
            lambda m, x, y: lambda: F.cross_entropy(m(x), y).backward() or F.cross_entropy(m(x), y),
            RuntimeError,
        ),
        (lambda m, x, y: lambda: F.cross_entropy(m(x), y) * float("nan"), NonFiniteLossError),
    ],
    ids=["missing", "non-tensor", "non-scalar", "calls-backward", "non-finite"],
)
def test_bad_closures_raise_and_leave_the_weights_untouched(make_closure, error):
    model = mlp()
    before = copy.deepcopy(model)
    x, y = batch()
    opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5)
    with pytest.raises(error):
        opt.step(make_closure(model, x, y))
    assert params_equal(model, before) and opt.steps == 0


def test_a_bad_beta_schedule_raises_before_any_weight_changes():
    model = mlp()
    before = copy.deepcopy(model)
    opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), beta_schedule=lambda t: 2.0)
    with pytest.raises(ValueError, match="Invalid beta"):
        opt.step(closure_for(model, *batch()))
    assert params_equal(model, before)


def test_a_closure_failing_in_a_perturbed_pass_leaves_the_weights_restored():
    model = mlp()
    before = copy.deepcopy(model)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyError("boom")
        return F.cross_entropy(model(x), y)

    x, y = batch()
    for restore in ("copy", "inplace"):
        calls[0] = 0
        opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5, restore=restore)
        with pytest.raises(KeyError):
            opt.step(closure)
        for p, q in zip(model.parameters(), before.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# -- scales=: a model quantized by someone else ------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, s):
        return torch.clamp(torch.round(w / s), -2, 1) * s

    @staticmethod
    def backward(ctx, g):
        return g, None


class UserFakeQuantLinear(nn.Linear):
    """Another library's 2-bit fixed-step linear layer: metaste's registry does not know it."""

    def __init__(self, lin: nn.Linear, s: torch.Tensor):
        super().__init__(lin.in_features, lin.out_features)
        self.load_state_dict({"weight": lin.weight, "bias": lin.bias})
        self.register_buffer("s", s)

    def forward(self, x):
        return F.linear(x, _RoundSTE.apply(self.weight, self.s), self.bias)


def test_scales_manages_a_user_fake_quant_model_like_the_registry_path():
    ours = mlp()
    torch.manual_seed(0)
    theirs = nn.Sequential(*[copy.deepcopy(m) for m in ours])
    for i, m in enumerate(ours):
        if isinstance(m, metaste.QuantLinear):
            theirs[i] = UserFakeQuantLinear(m, m.weight_quant.s.clone())
    assert not any(metaste.quant.lookup(p) is not None for p in theirs.parameters())
    scales = {m.weight: (m.s, "identity") for m in theirs if isinstance(m, UserFakeQuantLinear)}
    opt_a = FOGZO(torch.optim.SGD(ours.parameters(), lr=0.1), total_steps=6, seed=2)
    opt_b = FOGZO(torch.optim.SGD(theirs.parameters(), lr=0.1), total_steps=6, seed=2, scales=scales)
    for t in range(6):
        x, y = batch(seed=t)
        opt_a.step(closure_for(ours, x, y))
        opt_b.step(closure_for(theirs, x, y))
    assert params_equal(ours, theirs)


def test_scales_validation():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter"):
        FOGZO(opt, total_steps=5, scales={nn.Parameter(torch.ones(2)): 0.1})
    with pytest.raises(ValueError, match="Invalid STE kind"):
        FOGZO(opt, total_steps=5, scales={model.weight: (0.1, "sigmoid")})
    with pytest.raises(ValueError, match="finite, > 0"):
        FOGZO(opt, total_steps=5, scales={model.weight: 0.0})
    with pytest.raises(ValueError, match="broadcast"):
        FOGZO(opt, total_steps=5, scales={model.weight: torch.ones(3, 1)})


# -- torch.distributed -------------------------------------------------------------------------

DDP_STEPS = 10


def _ddp_data():
    return [batch(seed=t, size=16, dtype=torch.float64) for t in range(DDP_STEPS)]


def _ddp_run(model, data):
    opt = FOGZO(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), total_steps=DDP_STEPS, seed=5)
    for x, y in data:
        opt.step(closure_for(model, x, y))


def _ddp_worker(rank, path):
    model = mlp(dtype=torch.float64)
    ddp = nn.parallel.DistributedDataParallel(model)
    data = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in _ddp_data()]
    _ddp_run(ddp, data)
    torch.save([p.detach() for p in model.parameters()], f"{path}.{rank}")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_agree_and_match_one_process_on_the_whole_batch(tmp_path):
    path = str(tmp_path / "p")
    spawn_ranks(_ddp_worker, path)
    p0, p1 = (torch.load(f"{path}.{r}") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    model = mlp(dtype=torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    _ddp_run(model, _ddp_data())
    assert not all(torch.equal(a, b) for a, b in zip(p0, start))
    for a, b in zip(p0, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-11)
