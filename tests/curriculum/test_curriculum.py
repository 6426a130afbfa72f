"""QuantCurriculum (docs/design.md §12): the schedules against their formulas, each mask law against
its definition, the mixed forward and its gradient against a hand-written loop, the plain
quantized model bit for bit when off or past T_c, exact resume, composition with the wrappers and
refusal of a second curriculum, one compiled graph while the masks change."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.curriculum import CURRICULA, QuantCurriculum, ratio


def mlp(seed=0, surrogate="ste"):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    return metaste.quantize_model(net, bits=2, surrogate=surrogate, keep_last=False)


def cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return metaste.quantize_model(net, bits=2, keep_last=False)


def data(step, n=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model, steps, cur=None, opt=None, first=0):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for t in range(first, first + steps):
        x, y = data(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if cur is not None:
            cur.step()
    return opt


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- schedules -------------------------------------------------------------------------------------


def test_schedules_follow_their_formulas():
    T = 40
    for t in (0, 7, 20, 33):
        tau = t / T
        assert ratio(t, T, "linear") == tau
        assert ratio(t, T, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi * tau)))
        assert ratio(t, T, "log", k=9) == pytest.approx(math.log1p(9 * tau) / math.log1p(9))
        assert ratio(t, T, "step", stages=4) == math.floor(tau * 4) / 4
    for s in ("linear", "cosine", "log", "step"):
        assert ratio(T, T, s) == 1.0 and ratio(T + 5, T, s) == 1.0 and ratio(0, 0, s) == 1.0


# -- the mask laws ---------------------------------------------------------------------------------


def mixes(name, steps, model=None, **kw):
    model = model or mlp()
    cur = QuantCurriculum(model, total_steps=2 * steps, curriculum=name, length=0.5, **kw)
    out = []
    for _ in range(steps):
        out.append(
            [
                None if layer.curriculum_mix is None else layer.curriculum_mix.clone()
                for layer, _ in cur.layers
            ]
        )
        cur.step()
    return cur, out


def test_random_masks_hit_the_ratio_and_are_redrawn_every_step():
    cur, out = mixes("random", 20)
    for t in (5, 10, 15):
        m = out[t][0]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert abs(float(m.mean()) - cur.ratio(t)) < 0.12  # 384 elements
    assert not torch.equal(out[10][0], out[11][0])
    _, again = mixes("random", 20)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again))  # counter-seeded: the same stream


def test_nested_masks_only_grow():
    _, out = mixes("nested", 20)
    for a, b in zip(out, out[1:]):
        assert torch.all(b[0] >= a[0])
    assert float(out[-1][0].mean()) > 0.8


def test_noise_masks_are_constant_per_block():
    cur, out = mixes("noise", 10, model=cnn())
    conv, lin = out[6]
    assert conv.shape == (4, 1, 1, 1) and lin.shape == (3, 1)  # a kernel, an output row
    assert set(conv.unique().tolist()) <= {0.0, 1.0}


def test_nearest_masks_pick_the_elements_nearest_their_grid_point():
    model = mlp()
    cur = QuantCurriculum(model, total_steps=20, curriculum="nearest", length=0.5)
    train(model, 3, cur)
    layer, entry = cur.layers[0]
    rho, m = cur.ratio(), layer.curriculum_mix
    u = entry.u()
    err = (u - torch.round(u)).abs().flatten()
    k = math.ceil(rho * err.numel())
    assert int(m.sum()) == k
    assert float(err[m.flatten().bool()].max()) <= float(err[~m.flatten().bool()].min())


def test_switch_is_float_then_quantized_and_blend_is_the_ratio():
    _, out = mixes("switch", 10)
    assert all(float(ms[0]) == 0.0 for ms in out[:10])
    cur, out = mixes("blend", 10)
    assert [float(ms[0]) for ms in out] == pytest.approx([cur.ratio(t) for t in range(10)])


# -- the mixed forward against a hand-written loop ------------------------------------------------


@pytest.mark.parametrize("name", ["random", "nested", "noise", "nearest", "switch", "blend", "bits"])
def test_training_equals_a_hand_written_loop_with_the_mixed_weights(name):
    """The reference builds w̃ = where(m, Q(v), v) (blend: (1 − ρ)·v + ρ·Q(v)) itself and runs the
    layers functionally; the curriculum only supplies m."""
    model, ref = mlp(), mlp()
    cur = QuantCurriculum(model, total_steps=12, curriculum=name, length=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    layers = [m for m in ref if isinstance(m, nn.Linear)]
    for t in range(12):
        mix = [
            None if layer.curriculum_mix is None else layer.curriculum_mix.clone() for layer, _ in cur.layers
        ]
        bits = [layer.curriculum_bits for layer, _ in cur.layers]
        x, y = data(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        cur.step()
        h = x
        for i, layer in enumerate(layers):
            q = (
                layer.weight_quant(layer.weight)
                if bits[i] is None
                else layer.weight_quant.at_bits(layer.weight, bits[i])
            )
            m = mix[i]
            if m is None:
                w = q
            elif name == "blend":
                w = (1 - m) * layer.weight + m * q
            else:
                w = torch.where(m.bool(), q, layer.weight)
            h = F.linear(h, w, layer.bias)
            if i < len(layers) - 1:
                h = F.relu(h)
        ref_opt.zero_grad()
        F.cross_entropy(h, y).backward()
        ref_opt.step()
    a, b = weights(model), weights(ref)
    for k in a:
        if name == "blend":  # lerp rounds differently from (1 − ρ)·v + ρ·Q(v)
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k


def test_length_zero_and_after_the_curriculum_are_the_plain_quantized_model_bitwise():
    plain = mlp()
    train(plain, 6)
    model = mlp()
    train(model, 6, QuantCurriculum(model, total_steps=6, curriculum="random", length=0.0))
    assert_same(weights(plain), weights(model))
    model = mlp()
    cur = QuantCurriculum(model, total_steps=10, curriculum="random", length=0.3)
    train(model, 3, cur)
    x, _ = data(0)
    assert all(layer.curriculum_mix is None for layer, _ in cur.layers)
    clean = copy.deepcopy(model)
    assert torch.equal(model(x), clean(x))


def test_evaluation_sees_the_quantized_model():
    model = mlp()
    cur = QuantCurriculum(model, total_steps=10, curriculum="blend", length=1.0)
    x, _ = data(0)
    model.eval()
    quantized = model(x)
    cur.remove()
    assert torch.equal(quantized, model(x))
    model.train()
    assert torch.equal(model(x), model.eval()(x))  # removed: no mix in training either


@pytest.mark.parametrize("name, every", [("random", 1), ("nearest", 3)])
def test_state_dict_resumes_exactly(name, every):
    model = mlp()
    cur = QuantCurriculum(model, total_steps=20, curriculum=name, length=0.8, every=every)
    opt = train(model, 4, cur)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), cur.state_dict()))
    train(model, 5, cur, opt, first=4)
    fresh = mlp(seed=3)
    fresh.load_state_dict(saved[0])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_opt.load_state_dict(saved[1])
    fresh_cur = QuantCurriculum(fresh, total_steps=20, curriculum=name, length=0.8, every=every)
    fresh_cur.load_state_dict(saved[2])
    train(fresh, 5, fresh_cur, fresh_opt, first=4)
    assert_same(weights(model), weights(fresh))
    with pytest.raises(ValueError, match="other settings.*length"):
        QuantCurriculum(mlp(), total_steps=20, curriculum=name, length=0.5, every=every).load_state_dict(
            saved[2]
        )


# -- composition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["fogzo", "hyperste"])
def test_composes_with_fogzo_and_hyperste(wrapper):
    def run(length):
        model = mlp(surrogate="slste" if wrapper == "hyperste" else "ste")
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = (
            metaste.FOGZO(base, total_steps=8)
            if wrapper == "fogzo"
            else metaste.HyperSTE(base, method="analytical", hyper_lr=0.01)
        )
        cur = (
            None
            if length is None
            else QuantCurriculum(model, total_steps=8, curriculum="random", length=length)
        )
        for t in range(8):
            x, y = data(t)
            assert math.isfinite(float(opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))))
            if cur is not None:
                cur.step()
        return weights(model)

    bare = run(None)
    assert_same(run(0.0), bare)  # off: the wrapper's own run, bit for bit
    assert any(not torch.equal(a, b) for a, b in zip(run(0.5).values(), bare.values()))


def test_a_second_curriculum_on_the_same_weights_is_refused():
    model = mlp()
    cur = QuantCurriculum(model, total_steps=10)  # noqa: F841 - alive: it holds the weights
    with pytest.raises(ValueError, match="forward is already driven by a QuantCurriculum"):
        metaste.PEGE(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    model = mlp()
    pege = metaste.PEGE(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    with pytest.raises(ValueError, match="forward is already driven by a PEGE"):
        QuantCurriculum(model, total_steps=10)
    pege.remove()
    QuantCurriculum(model, total_steps=10)  # handed back: free again


def test_two_gradient_rules_on_the_same_weights_are_refused():
    model = mlp(surrogate="slste")
    hyper = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="gradient is already driven by a HyperSTE"):
        metaste.JacQuant(torch.optim.SGD(model.parameters(), lr=0.1), group=4)
    assert all(q.defer_surrogate for q in (mw.quantizer for mw in hyper.managed))  # left as it was
    hyper.release()
    metaste.JacQuant(torch.optim.SGD(model.parameters(), lr=0.1), group=4)


def test_compiled_model_does_not_recompile_while_the_masks_change():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    cur = QuantCurriculum(model, total_steps=12, curriculum="random", length=0.5)
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    graphs = []
    for t in range(5):  # inside the curriculum: the masks change in place
        x, y = data(t)
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        cur.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 4  # compiled once, at the first step


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(curriculum="cubic"), "Unknown curriculum"),
        (dict(length=1.5), "Invalid length"),
        (dict(schedule="exp"), "Invalid schedule"),
        (dict(total_steps=0), "Invalid total_steps"),
        (dict(every=0), "Invalid every"),
    ],
)
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantCurriculum(mlp(), **{"total_steps": 10, **kw})


def test_a_model_without_quantized_layers_is_refused():
    with pytest.raises(ValueError, match="no quantized layer"):
        QuantCurriculum(nn.Linear(3, 2), total_steps=10)


def test_every_registered_curriculum_is_tested():
    assert set(CURRICULA) == {"random", "nested", "switch", "blend", "noise", "nearest", "bits"}


# -- the bit-width curriculum -------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", ["fixed", "lsq"])
def test_a_finer_grid_is_the_same_range_with_the_step_halved_per_bit(quantizer):
    torch.manual_seed(0)
    layer = metaste.quantize_model(
        nn.Sequential(nn.Linear(12, 6)), bits=2, quantizer=quantizer, keep_last=False
    )[0]
    q = layer.weight_quant
    v = layer.weight.detach().clone().requires_grad_()
    s = q.scale(v)
    for b in (4, 8):
        sb = s / 2 ** (b - 2)
        qn, qp = 2 ** (b - 1), 2 ** (b - 1) - 1
        out = q.at_bits(v, b)
        assert torch.equal(out, torch.clamp(torch.round(v.detach() / sb), -qn, qp) * sb)
        (g,) = torch.autograd.grad(out.sum(), v)  # the clipped STE on the b-bit grid
        u = v.detach() / sb
        assert torch.equal(g, ((u >= -qn) & (u <= qp)).to(g.dtype))


def test_bits_steps_down_the_ladder_then_the_model_is_the_plain_quantized_one():
    model = mlp()
    cur = QuantCurriculum(model, total_steps=10, curriculum="bits", length=0.6, ladder=(4, 8))
    seen = []
    for _ in range(8):
        seen.append(cur.layers[0][0].curriculum_bits)
        cur.step()
    assert seen == [8, 8, 8, 4, 4, 4, None, None]  # T_c = 6: three steps at 8 bits, three at 4
    x, _ = data(0)
    cur2 = QuantCurriculum(mlp(), total_steps=10, curriculum="bits", length=0.6)
    layer = cur2.layers[0][0]
    h = F.linear(x, layer.weight_quant.at_bits(layer.weight, 8), layer.bias)
    assert torch.equal(layer(x), h)  # training forward at 8 bits
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight_quant(layer.weight), layer.bias))


def test_bits_needs_a_round_based_quantizer():
    torch.manual_seed(0)
    model = metaste.quantize_model(
        nn.Sequential(nn.Linear(12, 4)), bits=1, quantizer="dorefa", keep_last=False
    )
    with pytest.raises(ValueError, match="finer grids of a round-based quantizer"):
        QuantCurriculum(model, total_steps=10, curriculum="bits")
    with pytest.raises(ValueError, match="Invalid ladder"):
        QuantCurriculum(mlp(), total_steps=10, curriculum="bits", ladder=(1,))


def test_batchnorm_recalibration_sees_the_quantized_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model = metaste.quantize_model(net, bits=2, keep_last=False)
    plain = copy.deepcopy(model)
    cur = QuantCurriculum(model, total_steps=10, curriculum="blend", length=1.0)  # t = 0: float forward
    batches = [data(t)[0] for t in range(3)]
    metaste.recalibrate_bn(model, batches)
    metaste.recalibrate_bn(plain, batches)
    assert torch.equal(model[1].running_mean, plain[1].running_mean)
    assert model[0].curriculum_mix is not None and cur.t == 0  # given back afterwards
