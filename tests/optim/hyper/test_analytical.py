"""HyperSTE(method="analytical"): the branch rule of docs/design.md §3.1 against a hand-computed table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import metaste
from metaste import HyperSTE
from metaste.optim.hyper.analytical_math import REGIONS, analytical_update
from tests.helpers.hyperste import batches, loss_fn, quantized_mlp

QN, QP = 2, 1  # 2-bit grid
# (a, u, c, region, a' for halve, threshold, passive); η_a = 1, max_halvings = 10
TABLE = [
    # u = 0.5: r = 1 − a·u/Qp = 0.5; x = 0.25 < r → unique scaling, a/(1 − x)
    (1.0, 0.5, 0.25, "unique_scaling", 4 / 3, 4 / 3, 4 / 3),
    (2.0, 0.25, 0.25, "unique_scaling", 8 / 3, 8 / 3, 8 / 3),
    # u < 0: r = 1 + a·u/Qn = 0.5; x = −1 → a/2
    (1.0, -1.0, -1.0, "unique_scaling", 0.5, 0.5, 0.5),
    # u = 0: r = 1
    (1.0, 0.0, 0.5, "unique_scaling", 2.0, 2.0, 2.0),
    # u = 2: r = −1 (clipped), x = 0.5 ≥ r → unique identity
    (1.0, 2.0, 0.5, "unique_identity", 1.0, 1.0, 1.0),
    # exactly on the band edge (a·u = Qp): r = 0 counts as clipped
    (1.0, 1.0, 0.1, "unique_identity", 1.0, 1.0, 1.0),
    # clipped and x = −2 < r = −1 → overlap: identity in every mode
    (1.0, 2.0, -2.0, "overlap", 1.0, 1.0, 1.0),
    (1.0, -3.0, -1.0, "overlap", 1.0, 1.0, 1.0),  # r = 1 − 1.5 = −0.5
    # gap, x = 0.75 ≥ r = 0.5: halve m = 1 → x = 0.375 → 1.6; threshold: full x → 4; passive: a
    (1.0, 0.5, 0.75, "gap", 1.6, 4.0, 1.0),
    # gap, x = 3: halve m = 3 → 0.375 → 1.6; threshold: 1 − x ≤ 0 → the halve result
    (1.0, 0.5, 3.0, "gap", 1.6, 1.6, 1.0),
    # gap, x = 1000 needs m = 11 > max_halvings = 10: not updated
    (1.0, 0.5, 1000.0, "gap", 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("mode_index,resolve", [(4, "halve"), (5, "threshold"), (6, "passive")])
def test_analytical_branch_rule_matches_the_hand_computed_table(mode_index, resolve):
    cols = list(zip(*TABLE))
    a, u, c = (torch.tensor(col, dtype=torch.float64) for col in cols[:3])
    res = analytical_update(a, u, c, 1.0, QN, QP, resolve, max_halvings=10)
    torch.testing.assert_close(res.a, torch.tensor(cols[mode_index], dtype=torch.float64), rtol=1e-15, atol=0)
    for name in REGIONS:
        expected = torch.tensor([row[3] == name for row in TABLE])
        assert torch.equal(res.regions[name], expected), name
    assert torch.equal(sum(res.regions[n].long() for n in REGIONS), torch.ones(len(TABLE), dtype=torch.long))
    if resolve == "halve":
        assert res.halvings.tolist()[-3:] == [1.0, 3.0, 0.0]
        assert res.unresolved.tolist() == [False] * (len(TABLE) - 1) + [True]


def test_halving_count_is_the_smallest_power_of_two_even_at_exact_ties():
    # x·2^−m == r exactly must halve once more (legal scaling needs x·2^−m < r)
    u = torch.full((4,), 0.5, dtype=torch.float64)  # r = 0.5
    c = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    res = analytical_update(torch.ones(4, dtype=torch.float64), u, c, 1.0, QN, QP, "halve", 30)
    assert res.halvings.tolist() == [2.0, 3.0, 1.0, 2.0]


def halvings_by_loop(x: float, r: float, max_halvings: int) -> int | None:
    """The reference: halve η_a (x = η_a·c) until scaling is legal (x·2^−m < r), thesis 4.3;
    ``None`` past ``max_halvings`` (the element is not updated)."""
    m = 0
    while not x < r:
        if m == max_halvings:
            return None
        x, m = x / 2, m + 1  # halving a float is exact
    return m


@settings(max_examples=300, deadline=None)
@given(
    u=st.floats(0.01, 0.99),
    c=st.one_of(st.floats(1e-3, 1e6), st.sampled_from([0.5, 1.0, 2.0, 3.0, 6.0, 0.75, 2.0**20])),
    a=st.floats(0.25, 2.0),
    max_halvings=st.integers(0, 40),
)
def test_closed_form_halving_count_equals_the_loop(u, c, a, max_halvings):
    a_t, u_t = torch.tensor([a], dtype=torch.float64), torch.tensor([u], dtype=torch.float64)
    res = analytical_update(
        a_t, u_t, torch.tensor([c], dtype=torch.float64), 1.0, QN, QP, "halve", max_halvings
    )
    r = float(torch.minimum(1 - a_t * u_t / QP, 1 + a_t * u_t / QN))
    assume(r > 0)  # unclipped: unique scaling (m = 0) or the gap (m ≥ 1)
    m = halvings_by_loop(c, r, max_halvings)
    if m is None:
        assert bool(res.unresolved) and res.a.item() == a and res.halvings.item() == 0
    else:
        assert not bool(res.unresolved) and res.halvings.item() == m
        assert res.a.item() == a / (1 - c * 2.0**-m)


def test_max_halvings_zero_leaves_every_gap_element_unchanged():
    res = analytical_update(torch.ones(1), torch.tensor([0.5]), torch.tensor([0.75]), 1.0, QN, QP, "halve", 0)
    assert res.a.item() == 1.0 and res.unresolved.item()


def test_analytical_keeps_a_in_the_clamp_and_reports_fractions_summing_to_one():
    model = quantized_mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=1e-4), hyper_lr=0.5, model=model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(8):
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))
        sched.step()
        d = opt.diagnostics
        assert sum(d["branch_fractions"].values()) == pytest.approx(1.0)
        for layer in d["layers"].values():
            assert sum(layer[r] for r in REGIONS) == pytest.approx(1.0)
    for _, e in metaste.quantized_weights(model):
        s = e.surrogate
        assert bool((s.a >= s.a_min).all() and (s.a <= s.a_max).all())
        assert not torch.equal(s.a, torch.ones_like(s.a))
    layer = next(iter(d["layers"].values()))
    assert {
        "mean",
        "min",
        "max",
        "q05",
        "q50",
        "q95",
        "hist",
        "frac_at_min",
        "frac_at_max",
        "clipped_frac",
    } <= set(layer)
    assert d["hypergrad_norm"] > 0


def test_analytical_diagnostics_are_the_values_of_the_update_it_applied(monkeypatch):
    """Per layer, the region fractions, halvings and clipped fraction are those of the
    analytical_update results the step applied, and a is their clamped a'."""
    import metaste.optim.hyper.analytical as analytical

    calls = []

    def recording(*args, **kw):
        res = analytical_update(*args, **kw)
        calls.append((args, res))
        return res

    monkeypatch.setattr(analytical, "analytical_update", recording)
    model = quantized_mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.2), hyper_lr=0.5, model=model)
    entries = list(metaste.quantized_weights(model))
    for x, y in batches(4):
        calls.clear()
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))
        d = opt.diagnostics
        assert len(calls) == len(entries)
        total = sum(e.weight.numel() for _, e in entries)
        for (name, e), (args, res) in zip(entries, calls):
            n = e.weight.numel()
            layer = d["layers"][name]
            for r in REGIONS:
                assert layer[r] == float(res.regions[r].count_nonzero()) / n
                assert d["branch_fractions"][r] == pytest.approx(
                    sum(float(c[1].regions[r].count_nonzero()) for c in calls) / total
                )
            assert layer["halvings"] == float(res.halvings.sum())
            assert layer["unresolved_frac"] == float(res.unresolved.sum()) / n
            a = res.a.clamp(e.surrogate.a_min, e.surrogate.a_max)
            assert torch.equal(e.surrogate.a, a)
            u = args[1]
            psi = analytical.slste(u, a, e.qn, e.qp)
            assert layer["clipped_frac"] == float((psi == 0).sum()) / n
    assert any(float(c[1].regions["unique_scaling"].count_nonzero()) for c in calls)


def test_analytical_uses_the_lr_of_the_previous_update():
    """η_w in c is the lr the previous update used (LR schedulers change it between steps)."""
    model = quantized_mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.2), hyper_lr=0.0)
    x, y = batches(1)[0]
    opt.step(lambda: loss_fn(model, x, y))
    opt.param_groups[0]["lr"] = 0.05
    opt.step(lambda: loss_fn(model, x, y))
    lrs = [h["lr"] for h in opt.state_dict()["metaste"]["method"]["history"]]
    assert lrs == [0.05] * len(lrs)  # recorded for the next step: this step's update used 0.05


def test_normalized_hyper_lr_moves_a_by_about_hyper_lr_per_step():
    model = quantized_mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), hyper_lr=0.01, resolve="passive")
    data = batches(6)
    for x, y in data:
        before = [t.clone() for _, t in metaste.surrogate_parameters(model)]
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))
    rel = torch.cat(
        [((t - b) / b).flatten() for (_, t), b in zip(metaste.surrogate_parameters(model), before)]
    )
    moved = rel[rel != 0]
    rms = float(moved.pow(2).mean().sqrt())
    assert 0.003 < rms < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("boundary,b", [("none", 0.5), ("window", 0.5), ("window", 0.3), ("window", 2.0)])
def test_the_region_code_of_d_rebuilds_slste_grad_bit_for_bit(dtype, boundary, b):
    """the history keeps ∂ψ/∂a as a one-byte region code; rebuilt with the same a it is
    slste_grad's value bit for bit, band edges, |τ − a| = b, u = 0 and NaN included."""
    from metaste.optim.hyper.analytical import slste_grad_code, slste_grad_from_code
    from metaste.quant.psi import slste_grad

    g = torch.Generator().manual_seed(0)
    u = (torch.randn(4000, generator=g, dtype=dtype) * 2).round(decimals=2)
    a = (torch.rand(4000, generator=g, dtype=dtype) * 3 + 0.25).round(decimals=2)
    u[:8] = torch.tensor([0.0, 1.0, -2.0, 0.5, float("nan"), 2.0, -4.0, 0.25], dtype=dtype)
    a[:8] = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 2.0], dtype=dtype)
    full = slste_grad(u, a, QN, QP, boundary, b)
    code = slste_grad_code(u, a, QN, QP, boundary, b)
    assert code.dtype == torch.uint8 and int(code.max()) <= (3 if boundary == "window" else 1)
    rebuilt = slste_grad_from_code(code, a, boundary, b)
    assert torch.equal(rebuilt.view(torch.int64 if dtype == torch.float64 else torch.int32),
                       full.view(torch.int64 if dtype == torch.float64 else torch.int32))  # fmt: skip


@pytest.mark.compiled
@pytest.mark.parametrize("boundary", ["none", "window"])
def test_the_compiled_history_product_from_the_code_is_the_full_one(boundary):
    """c = η_w·g·g⁻·d⁻ with d⁻ rebuilt from the compiled back pass's region code equals
    the product with the full d⁻ of slste_grad, bit for bit; the front without x, r gives the same
    a′ and counts as the full front."""
    from metaste import _compile
    from metaste.optim.hyper import analytical_math as an
    from metaste.quant.psi import slste_grad

    g0 = torch.Generator().manual_seed(1)
    n = (300, 256)
    u, g, gp, c = (torch.randn(n, generator=g0) * s for s in (2.0, 1e-2, 1e-2, 1e-3))
    a = torch.rand(n, generator=g0) * 3 + 0.25
    a_new = a * (1 + 0.1 * torch.randn(n, generator=g0))
    a_clamped = a_new.clamp(0.25, 4.0)
    grad_ref = slste_grad(u, a_clamped, QN, QP, boundary, 0.5)  # the history's full d⁻ (eager)
    psi_ref = metaste.quant.psi.slste(u, a_clamped, QN, QP).mul_(g)
    c_in = c.clone()
    code, _, _ = _compile.kernel(an._back, "analytical", True)(
        u, a, a_new, g, c_in, float(QN), float(QP), boundary == "window", 0.5, 0.25, 4.0
    )
    assert torch.equal(a_new, a_clamped) and torch.equal(c_in, psi_ref)  # written in place
    lr = torch.tensor(0.05)
    g2 = torch.randn(n, generator=g0)
    got = _compile.kernel(an._history_product_code, "analytical", True)(
        g2, lr, g, code, a_clamped, boundary == "window", 0.5
    )
    want = torch.mul(g2, 0.05).mul_(g).mul_(grad_ref)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    eta = torch.tensor(10.0)
    x, r, a_full, counts_full = _compile.kernel(an._front, "analytical", True)(a, u, c, eta, 2.0, 1.0)
    a_cnt, counts = an._front_counts(a, u, c, eta, 2.0, 1.0)
    assert torch.equal(a_cnt, a_full) and torch.equal(counts, counts_full)
    assert not _compile._BROKEN, _compile._BROKEN


def test_a_base_step_that_raises_leaves_a_and_the_model_as_they_were():
    """a ← a′ happens after the base step (the step guard holds no copy of θ), so a step
    that raises in the base optimizer changes no surrogate parameter."""
    model = quantized_mlp()
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.5), hyper_lr=0.5)
    data = batches(3)
    for x, y in data[:2]:
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*args, **kwargs):
        raise RuntimeError("base step failed")

    opt.optimizer.step = boom
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.step(lambda: loss_fn(model, *data[2]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
