"""FOGZO's counter-based noise and fused passes (docs/design.md §4.2, §4.5): the stream is a
pure function of (key, index), the compiled kernels give the eager path's bits, and on CUDA the noise
is made on the device with the CPU's bits."""

from __future__ import annotations

import copy

import pytest
import torch

import metaste
from metaste import _compile
from metaste._compile import kernel
from metaste.optim.core import noise as noise_module
from metaste.optim.core.noise import SQRT3, SQRT6, derive_seed, key_halves, noise, noise_slice, z_from_index
from metaste.optim.fogzo.passes import combine_, perturb_, restore_combine_

pytestmark = pytest.mark.compiled


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: the other tests of a worker process compile the same
    kernels for other dtypes and shapes, and fullgraph kernels past Dynamo's recompile limit fail."""
    torch._dynamo.reset()
    _compile._COMPILED.clear()
    yield


CUDA = torch.cuda.is_available()


def _python_halves(key: int, j: int) -> tuple[int, int]:
    """The documented generator in plain Python integers (docs/design.md §4.2): the signed high
    and low 16 bits of h((j·γ + key_lo) ^ key_hi), h the low-bias hash, all mod 2^32."""
    mask = 0xFFFFFFFF

    def h(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    bits = h(((j * 0x9E3779B9 + (key & mask)) & mask) ^ ((key >> 32) & mask))
    signed16 = lambda u: u - (1 << 16) if u >= 1 << 15 else u  # noqa: E731
    return signed16(bits >> 16), signed16(bits & 0xFFFF)


@pytest.mark.parametrize("kind,dtype", [("identity", torch.float32), ("approxsign", torch.float64)])
def test_compiled_noise_gives_the_eager_bits(kind, dtype, monkeypatch):
    """noise_slice from FUSE_MIN elements on is one compiled pass: the eager stream, bit for bit,
    for two seeds through one compiled variant (the key is a tensor argument)."""
    for seed in (derive_seed(3, 1, 0, 0), derive_seed(3, 2, 0, 1)):
        outs = []
        for limit in (1 << 40, 1):
            monkeypatch.setattr(noise_module, "FUSE_MIN", limit)
            outs.append(noise_slice(kind, 5, 1000, seed, torch.device("cpu"), dtype))
        assert torch.equal(outs[0], outs[1])
    assert not _compile._BROKEN, _compile._BROKEN
    assert "z_from_index" in _compile._COMPILED


def test_the_stream_is_the_documented_hash_of_key_and_index():
    """The torch stream equals the generator written in plain Python integers (a change of the
    stream must be deliberate), and any slice of the index range gives the whole tensor's values."""
    key = derive_seed(3, 1, 4, 1)
    ref = [_python_halves(key, j) for j in range(2000)]
    # W = (k + ½)/2^15 is exact in float32; the samplers then scale it in float32
    w_hi = torch.tensor([(hi + 0.5) / 2**15 for hi, _ in ref], dtype=torch.float32)
    w_lo = torch.tensor([(lo + 0.5) / 2**15 for _, lo in ref], dtype=torch.float32)
    z = noise("identity", torch.Size([2000]), key, torch.device("cpu"), torch.float32)
    assert torch.equal(z, w_hi * SQRT3)
    z = noise("approxsign", torch.Size([2000]), key, torch.device("cpu"), torch.float32)
    assert torch.equal(z, (w_hi + w_lo) * (SQRT6 / 2))
    k1, k2 = key_halves(12345)
    whole = z_from_index("approxsign", torch.arange(1000, dtype=torch.int32), k1, k2)
    part = z_from_index("approxsign", torch.arange(200, 300, dtype=torch.int32), k1, k2)
    assert torch.equal(whole[200:300], part)
    assert torch.equal(
        whole, noise("approxsign", torch.Size([1000]), 12345, torch.device("cpu"), torch.float32)
    )


def _case(dtype, per_channel):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(37, 11, generator=g, dtype=dtype)
    grad = torch.randn(37, 11, generator=g, dtype=dtype)
    eps = (
        (torch.rand(37, 1, generator=g, dtype=dtype) + 0.5) if per_channel else torch.tensor(0.3, dtype=dtype)
    )
    return v, grad, eps


def _perturb_args(v, grad, eps, key, alpha, with_g):
    k1, k2 = key_halves(key)
    s = lambda x, dt=v.dtype: torch.tensor(x, dtype=dt)  # noqa: E731
    return [v, grad if with_g else None, eps * eps, eps * 0.7, s(0.37), s(alpha), s(k1, torch.int32),
            s(k2, torch.int32)]  # fmt: skip


@pytest.mark.parametrize(
    "kind,dtype,per_channel,with_g",
    [("identity", torch.float32, True, True), ("approxsign", torch.float64, False, False)],
)
def test_compiled_passes_give_the_eager_bits(kind, dtype, per_channel, with_g):
    v, grad, eps = _case(dtype, per_channel)
    for alpha in (1.0, -2.0):
        outs = []
        for fused in (False, True):
            w = v.clone()
            kernel(perturb_, kind, fused)(*_perturb_args(w, grad, eps, 99, alpha, with_g), kind)
            outs.append(w)
        assert not _compile._BROKEN, _compile._BROKEN
        assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], v)
    vals = torch.tensor([0.25, -1.5], dtype=dtype)
    k1s, k2s = (torch.tensor(x, dtype=torch.int32) for x in zip(key_halves(5), key_halves(6)))
    outs = []
    for fused in (False, True):
        G = grad.clone()
        kernel(combine_, kind, fused)(G, eps, torch.tensor(0.5, dtype=dtype), False, vals, k1s, k2s, kind)
        outs.append(G)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("fused", [False, True])
def test_shard_passes_give_the_rows_of_the_whole_tensor(fused):
    """FSDP2 (docs/design.md §10.4): a shard's passes at its global offset give exactly its rows of the whole tensor's passes (eager and compiled)."""
    kind, dtype = "approxsign", torch.float64
    v, grad, eps = _case(dtype, True)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    whole = v.clone()
    kernel(perturb_, kind, fused)(*_perturb_args(whole, grad, eps, 99, 1.0, True), kind)
    vals = torch.tensor([0.25, -1.5], dtype=dtype)
    k1s, k2s = (torch.tensor(x, dtype=torch.int32) for x in zip(key_halves(5), key_halves(6)))
    G = grad.clone()
    kernel(combine_, kind, fused)(G, eps, torch.tensor(0.5, dtype=dtype), False, vals, k1s, k2s, kind)
    for lo, hi in [(0, 19), (19, 37), (5, 8)]:  # (a one-row shard would compile its own size-1 variant)
        part = v[lo:hi].clone()
        args = _perturb_args(part, grad[lo:hi], eps[lo:hi], 99, 1.0, True)
        kernel(perturb_, kind, fused)(*args, kind, i32(lo * 11))
        assert torch.equal(part, whole[lo:hi])
        Gp = grad[lo:hi].clone()
        kernel(combine_, kind, fused)(
            Gp,
            eps[lo:hi],
            torch.tensor(0.5, dtype=dtype),
            False,
            vals,
            k1s,
            k2s,
            kind,
            i32(lo * 11),
        )
        assert torch.equal(Gp, G[lo:hi])
    assert not _compile._BROKEN, _compile._BROKEN


def test_a_fused_fogzo_run_equals_the_eager_one_bitwise():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)
    )
    base = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    runs = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), n=2, total_steps=10, fused=fused)
        for _ in range(3):
            opt.step(lambda m=model: torch.nn.functional.cross_entropy(m(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("kind,dtype,n", [("identity", torch.float32, 1), ("approxsign", torch.float64, 2)])
def test_the_fused_restore_and_combine_give_the_bits_of_the_two_passes(kind, dtype, n):
    """restore_combine_ (the in-place restore of the last sample fused with the combine)
    gives exactly perturb_ and then combine_, eagerly and compiled."""
    v, grad, eps = _case(dtype, True)
    keys = [key_halves(5 + i) for i in range(n)]
    vals = torch.tensor([0.25, -1.5][:n], dtype=dtype)
    k1s, k2s = (torch.tensor(x, dtype=torch.int32) for x in zip(*keys))
    s = lambda x, dt=dtype: torch.tensor(x, dtype=dt)  # noqa: E731
    w0, G0 = v.clone(), grad.clone()
    args = [
        grad,
        eps * eps,
        eps * 0.7,
        s(0.37),
        s(1.0),
        s(keys[-1][0], torch.int32),
        s(keys[-1][1], torch.int32),
    ]
    perturb_(w0, *args, kind)
    combine_(G0, eps, s(0.5), False, vals, k1s, k2s, kind)
    for fused in (False, True):
        w, G = v.clone(), grad.clone()
        args[0] = G  # G is g itself, as in FOGZO: the restore reads g before the combine overwrites it
        kernel(restore_combine_, kind, fused)(w, *args, G, eps, s(0.5), False, vals, k1s, k2s, kind)
        assert torch.equal(w, w0) and torch.equal(G, G0)
    assert not _compile._BROKEN, _compile._BROKEN


@pytest.mark.parametrize("n", [1, 2])
def test_a_fused_inplace_fogzo_run_equals_the_eager_one_bitwise(n):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    base = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    runs = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = metaste.FOGZO(
            torch.optim.SGD(model.parameters(), lr=0.1), n=n, total_steps=10, fused=fused, restore="inplace"
        )
        for _ in range(3):
            opt.step(lambda m=model: torch.nn.functional.cross_entropy(m(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not _compile._BROKEN, _compile._BROKEN


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_the_eager_regenerating_path_equals_the_kept_noise_bitwise(restore):
    """Above FUSE_MIN noise values the eager path regenerates the noise (and fuses the in-place
    restore with the combine); below it keeps the noise: both give keep_noise=True's bits."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
    base = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
    assert sum(e.weight.numel() for _, e in metaste.quantized_weights(base)) > _compile.FUSE_MIN
    x, y = torch.randn(8, 300), torch.randint(0, 3, (8,))
    runs = []
    for keep in (False, True):
        model = copy.deepcopy(base)
        opt = metaste.FOGZO(
            torch.optim.SGD(model.parameters(), lr=0.1),
            n=2,
            total_steps=10,
            fused=False,
            restore=restore,
            keep_noise=keep,
        )
        for _ in range(2):
            opt.step(lambda m=model: torch.nn.functional.cross_entropy(m(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["identity", "approxsign", "hardtanh"])
def test_cuda_noise_is_made_on_the_device_with_the_cpu_bits(kind):
    seed = derive_seed(3, 1, 0, 2)
    on_gpu = noise(kind, torch.Size([513, 7]), seed, torch.device("cuda"), torch.float32)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(
        on_gpu.cpu(), noise(kind, torch.Size([513, 7]), seed, torch.device("cpu"), torch.float32)
    )


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_fogzo_step_keeps_everything_on_the_device_and_matches_the_cpu(fused):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)
    )
    base = metaste.quantize_model(net, bits=2, quantizer="fixed", surrogate="identity")
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    out = {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(base).to(dev)
        xd, yd = x.to(dev), y.to(dev)
        opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, fused=fused)
        for _ in range(2):
            opt.step(lambda m=model, xd=xd, yd=yd: torch.nn.functional.cross_entropy(m(xd), yd))
        out[dev] = [p.detach().cpu() for p in model.parameters()]
        assert all(p.device.type == dev for p in model.parameters())
    # same noise bits; the forwards differ in rounding between devices, so the c_i do too
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("boundary", ["window", "none"])
def test_hyperste_analytical_compiled_passes_give_the_eager_trajectory(monkeypatch, boundary):
    """above FUSE_MIN elements the analytical rule's element-wise front and back run as compiled
    passes; weights and a follow the eager trajectory bitwise."""
    import metaste.optim.hyper.analytical as analytical
    import metaste.optim.hyper.analytical_math as analytical_math

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    base = metaste.quantize_model(net, bits=2, surrogate="slste", keep_last=False)
    x, y = torch.randn(64, 300), torch.randint(0, 10, (64,))
    runs = []
    for limit in (1 << 40, analytical.FUSE_MIN):  # eager, then compiled for the 300×256 layer
        monkeypatch.setattr(analytical, "FUSE_MIN", limit)
        monkeypatch.setattr(analytical_math, "FUSE_MIN", limit)
        model = copy.deepcopy(base)
        opt = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.5), hyper_lr=0.05, boundary=boundary)
        for _ in range(4):
            opt.step(lambda m=model: torch.nn.functional.cross_entropy(m(x), y))
        runs.append([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())])
    assert not _compile._BROKEN, _compile._BROKEN
    assert {"_front", "_back"} <= set(_compile._COMPILED)  # the compiled passes did run
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("resolve", ["halve", "threshold", "passive"])
def test_hyperste_analytical_compiled_counts_give_the_eager_stats_and_trajectory(monkeypatch, resolve):
    """the compiled front counts the regions instead of building their masks and halves
    only the gap elements; a, the weights and every per-layer statistic follow the eager path."""
    import metaste.optim.hyper.analytical as analytical
    import metaste.optim.hyper.analytical_math as analytical_math

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(300, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    base = metaste.quantize_model(net, bits=2, surrogate="slste", keep_last=False)
    x, y = torch.randn(64, 300), torch.randint(0, 10, (64,))
    runs, stats = [], []
    for limit in (1 << 40, analytical.FUSE_MIN):
        monkeypatch.setattr(analytical, "FUSE_MIN", limit)
        monkeypatch.setattr(analytical_math, "FUSE_MIN", limit)
        model = copy.deepcopy(base)
        opt = metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.5), hyper_lr=2.0, resolve=resolve)
        steps = []
        for _ in range(4):
            opt.step(lambda m=model: torch.nn.functional.cross_entropy(m(x), y))
            steps.append(copy.deepcopy(opt.method.step_stats))
        runs.append([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())])
        stats.append(steps)
    assert not _compile._BROKEN, _compile._BROKEN
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert stats[0] == stats[1]
    big = [s for step in stats[1] for name, s in step.items() if s["gap"] > 0]
    assert big, "no step had gap elements: the halving path was not exercised"
