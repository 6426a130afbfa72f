"""One run and many: pairing by seed, determinism, worker processes."""

import math

import pytest
import torch

from metaste.bench import stats
from metaste.bench.runner import RunSpec, cost, loss_at, run_all, run_one, worker_pool
from metaste.quant.layers import QuantLayer


def _spec(method="ste", seed=0, steps=30, **kw):
    return RunSpec("digits-mlp", method, method, seed, 0.1, steps, 2, "lsq", **kw)


def test_mean_ci_matches_scipy_t_interval():
    st = pytest.importorskip("scipy.stats")
    x = [0.3, 1.2, 0.7, 2.2, 1.1]
    m, h = stats.mean_ci(x)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=sum(x) / len(x), scale=st.sem(x))
    assert m == pytest.approx((lo + hi) / 2) and h == pytest.approx((hi - lo) / 2, rel=1e-3)


def test_paired_ci_uses_per_seed_differences():
    m, h = stats.paired_diff_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert m == pytest.approx(0.5) and h == pytest.approx(0.0)
    assert math.isnan(stats.mean_ci([1.0])[1])


def test_same_seed_gives_identical_runs_and_methods_are_paired():
    a, b = run_one(_spec()), run_one(_spec())
    assert a.losses == b.losses and a.final_metric == b.final_metric
    fp = run_one(_spec("fp32"))
    assert fp.bits is None and a.bits == 2  # fp32 is the unquantized reference
    assert fp.losses[0] != a.losses[0]  # ... so its first loss differs, but only by quantization:
    assert math.isclose(fp.losses[0], a.losses[0], rel_tol=0.2)  # same init and first batch
    assert run_one(_spec(seed=1)).losses[0] != a.losses[0]


def test_a_longer_run_is_the_shorter_run_continued():
    """What the equal-compute read-off relies on: no schedule, the same batch stream."""
    short, long = run_one(_spec(steps=20)), run_one(_spec(steps=40, marks=(20,)))
    assert long.losses[:20] == short.losses
    assert long.metric_at(20) == short.final_metric
    assert loss_at(long.losses, 20) == short.final_loss


def test_a_run_uses_one_thread_and_restores_the_callers_count():
    before = torch.get_num_threads()
    run_one(_spec(steps=2))
    assert torch.get_num_threads() == before


def test_tuning_runs_hold_out_validation_and_never_evaluate_the_test_set():
    r = run_one(_spec(holdout=True))
    assert r.phase == "tune" and r.eval_steps == [] and math.isnan(r.final_metric)
    assert math.isfinite(r.val_loss) and 0 < r.val_loss < 5
    assert r.losses != run_one(_spec()).losses  # different training rows


def test_a_diverging_run_is_marked_not_averaged():
    r = run_one(RunSpec("digits-mlp", "fp32", "fp32", 0, 1e38, 30, 2, "lsq"))
    assert r.diverged and len(r.losses) < 30 and math.isnan(r.final_metric)


def test_the_costliest_runs_go_first_and_results_keep_the_order_of_the_specs():
    """fogzo costs two extra forwards per step: 25 of its steps outweigh 40 of the STE's."""
    specs = [_spec("ste", steps=10), _spec("fogzo", steps=25), _spec("ste", steps=40)]
    assert cost(specs[1]) > cost(specs[2]) > cost(specs[0])
    lines: list[str] = []
    results = run_all(specs, workers=1, log=lines.append)
    assert [len(r.losses) for r in results] == [10, 25, 40]
    assert ["(25 steps)" in lines[0], "(40 steps)" in lines[1], "(10 steps)" in lines[2]] == [True] * 3


def _pid(_: int) -> int:
    import os
    import time

    time.sleep(0.3)  # long enough for every worker to take a task
    return os.getpid()


def test_results_are_identical_for_one_and_two_workers_and_one_pool_serves_several_batches():
    """Two workers give the runs of one process; a comparison's tuning and evaluation phases share
    the pool's processes (each starts and loads its data once)."""
    specs = [_spec(m, seed, steps=25) for m in ("ste", "fogzo") for seed in (0, 1)]
    one = run_all(specs, workers=1, log=lambda _: None)
    lines: list[str] = []
    with worker_pool(2) as pool:
        pids = set(pool.map(_pid, range(4)))
        assert len(pids) == 2
        two = run_all(specs, pool, log=lines.append)
        again = run_all(specs[::-1], pool, log=lambda _: None)
        assert set(pool.map(_pid, range(4))) == pids
    assert [r.losses for r in one] == [r.losses for r in two] == [r.losses for r in again[::-1]]
    assert [r.eval_values for r in one] == [r.eval_values for r in two]
    assert len(lines) == 4 and all("ETA" in line for line in lines)
    with pytest.raises(ValueError, match="workers must be ≥ 1"), worker_pool(0):
        pass


def test_a_float_phase_is_the_float_run_then_the_quantized_one():
    """ste-float with float_frac = 0.5: its first half is fp32's run step for step (same init,
    batches and optimizer); then the model is quantized and trains with the STE."""
    fp = run_one(_spec("fp32", steps=20))
    phased = run_one(_spec("ste-float", steps=20, options=(("float_frac", 0.5),)))
    assert phased.losses[:10] == fp.losses[:10]
    assert phased.losses[10] != fp.losses[10]
    assert phased.bits == 2 and math.isfinite(phased.final_metric)


def test_a_float_phase_of_zero_is_the_plain_ste():
    assert run_one(_spec("ste-float", options=(("float_frac", 0.0),))).losses == run_one(_spec()).losses


def test_an_extended_baseline_keeps_the_schedule_of_the_nominal_run():
    """The equal-compute read-off of a float-phase baseline: the float phase is set by
    ``schedule_steps``, so the longer run continues the nominal one."""
    opts = (("float_frac", 0.5),)
    short = run_one(_spec("ste-float", steps=20, options=opts))
    long = run_one(_spec("ste-float", steps=30, options=opts, schedule_steps=20, marks=(20,)))
    assert long.losses[:20] == short.losses
    assert long.metric_at(20) == short.final_metric


def test_metrics_during_a_float_phase_are_those_of_the_quantized_weights(monkeypatch):
    from metaste.bench.tasks import ClassificationTask

    seen = []

    def spy(task, model):
        seen.append(any(isinstance(m, QuantLayer) for m in model.modules()))
        return 50.0

    monkeypatch.setattr(ClassificationTask, "evaluate", spy)
    run_one(_spec("ste-float", steps=20, options=(("float_frac", 0.5),)))
    assert seen and all(seen)


def test_a_curriculum_method_steps_its_curriculum():
    plain = run_one(_spec("ste-identity", 0, steps=20))
    off = run_one(_spec("ste-identity+random", 0, steps=20, options={"cur_length": 0.0}))
    on = run_one(_spec("ste-identity+random", 0, steps=20, options={"cur_length": 0.5}))
    assert off.losses == plain.losses  # T_c = 0: the plain quantized run, bit for bit
    assert on.losses[0] != plain.losses[0] and on.losses[15:] != plain.losses[15:]
