"""The comparison protocol: tuning on held-out data, grid extension, the best-STE baseline,
equal compute and the verdicts."""

import dataclasses
import math

import pytest

from metaste.bench import tasks
from metaste.bench.compare import Protocol, Setup, check, compare
from metaste.bench.report import format_table, paired, verdict


@dataclasses.dataclass
class RiggedTask(tasks.ClassificationTask):
    """Validation prefers lr 0.05 (and the clipped STE); the test metric prefers lr 0.2."""

    calls: list = dataclasses.field(default_factory=list)

    def validation_loss(self, model):
        self.calls.append("val")
        clipped = all(e.surrogate.name == "ste" for _, e in _weights(model))
        return abs(math.log(self.lr / 0.05)) + (0.0 if clipped else 0.5)

    def evaluate(self, model):
        self.calls.append("test")
        return 100.0 - abs(math.log(self.lr / 0.2))


def _weights(model):
    from metaste.quant.registry import quantized_weights

    return quantized_weights(model)


@pytest.fixture
def rigged(monkeypatch):
    calls = []
    task = RiggedTask(
        "rigged",
        "digits, rigged validation",
        lambda: tasks.models.mlp((64, 8, 10)),
        optimizer="sgd",
        lr=0.1,
        steps=4,
        batch_size=16,
        metric="accuracy",
        eval_points=2,
        load=tasks.data.load_digits,
        calls=calls,
    )
    monkeypatch.setitem(tasks.TASKS, "rigged", task)
    return calls


def _run(methods, lrs, **kw):
    protocol = Protocol(methods=methods, seeds=[0, 1], tune_seeds=[100, 101], tune_lr=lrs, **kw)
    return compare(Setup("rigged"), protocol, workers=1, log=lambda _: None)


def test_tuning_picks_by_validation_loss_not_the_test_metric(rigged):
    comp = _run(["ste", "ste-identity"], [0.025, 0.05, 0.1, 0.2])
    assert comp.choices["ste"]["lr"] == 0.05  # the test-best lr would be 0.2
    assert comp.choices["ste"]["settings"] == 4
    assert comp.baseline == "ste"  # the rigged validation prefers the clipped STE
    tune = [r for r in comp.tuning if r["label"] == "ste"]
    assert len(tune) == 4 * 2 and {r["seed"] for r in tune} == {100, 101}
    # test metric is only ever computed in evaluation runs, after every validation score
    assert rigged.index("test") > max(i for i, c in enumerate(rigged) if c == "val")


def test_a_best_lr_at_the_edge_extends_the_grid(rigged):
    comp = _run(["ste", "ste-identity"], [0.2, 0.4, 0.8], max_extend=3)
    # 0.2 at the lower edge → 0.1 → 0.05 → 0.025: the best (0.05) now lies inside
    assert comp.choices["ste"]["lr"] == 0.05
    assert comp.choices["ste"]["grid"] == [0.025, 0.05, 0.1, 0.2, 0.4, 0.8]
    assert any(n.startswith("ste: lr grid extended 3×") and "edge" not in n for n in comp.notes)
    comp = _run(["ste", "ste-identity"], [0.8, 1.6], max_extend=1)
    assert comp.choices["ste"]["lr"] == 0.4
    assert any("still at its edge" in n for n in comp.notes)


def test_equal_compute_reads_the_baseline_at_the_methods_forward_passes(rigged):
    comp = _run(["ste", "ste-identity", "fogzo"], [0.05])
    assert comp.compute_steps == {"ste": 4, "ste-identity": 4, "fogzo": 7}  # 4 · 5 / 3 ≈ 7
    base_runs = [r for r in comp.runs if r["label"] == "ste"]
    assert all(r["steps"] == 7 and {"4", "7"} <= set(r["loss_at"]) for r in base_runs)
    assert "fogzo" in format_table(comp) and "baseline at 7 steps" in format_table(comp)


@pytest.mark.parametrize(
    "mean, half, lower, expected",
    [
        (-0.3, 0.1, True, "better"),
        (-0.3, 0.1, False, "worse"),
        (0.3, 0.1, True, "worse"),
        (0.3, 0.1, False, "better"),
        (0.05, 0.1, True, "no difference"),
        (-0.1, 0.1, False, "no difference"),  # a CI touching 0 does not exclude it
    ],
)
def test_verdict_needs_a_ci_that_excludes_zero(mean, half, lower, expected):
    assert verdict(mean, half, 10, lower) == expected


def test_paired_delta_counts_seeds_and_skips_diverged_pairs():
    d = paired([1.0, 2.0, 3.0, math.nan], [1.6, 2.5, 3.55, 1.0], lower_is_better=True)
    assert d.n == 3 and d.better == 3 and d.mean == pytest.approx(-0.55)
    assert d.verdict == "better"  # differences −0.6, −0.5, −0.55: half-width 0.124
    wide = paired([1.0, 2.0, 3.0], [2.0, 2.5, 3.5], lower_is_better=True)
    assert wide.better == 3 and wide.verdict == "no difference"  # −1, −0.5, −0.5: half-width 0.72
    tie = paired([1.0, 2.0, 3.0], [1.5, 1.5, 3.0], lower_is_better=True)
    assert tie.verdict == "no difference" and tie.better == 1
    assert verdict(0.5, math.nan, 1, True) == "too few seeds"


@pytest.mark.parametrize(
    "setup, protocol, match",
    [
        (Setup(), Protocol(["ste"], seeds=[0, 100]), "overlap"),
        (Setup(steps=0), Protocol(["ste"], seeds=[0]), "steps"),
        (Setup(), Protocol(["ste"], seeds=[0], tune_lr=[]), "empty"),
        (Setup(), Protocol(["ste"], seeds=[0], tune_lr=[0.1, -1.0]), "> 0"),
        (Setup(), Protocol(["sgd-magic"], seeds=[0]), "valid choices"),
        (Setup(), Protocol(["fogzo[window=2]"], seeds=[0]), "its options are"),
        (Setup(quant={"bits": 3}), Protocol(["ste"], seeds=[0]), "--bits"),
        (Setup(quant={"surogate": "pwl"}), Protocol(["ste"], seeds=[0]), "valid keys"),
        (Setup(method_opts={"beta_min": 0.9}), Protocol(["ste"], seeds=[0]), "read by none"),
        (Setup(), Protocol(["ste"], seeds=[0], tune={"n": [1, 2]}), "read by none"),
        (Setup(), Protocol(["ste"], seeds=[0], baseline="ste-pwl"), "not among"),
        (Setup(task="imagenet"), Protocol(["ste"], seeds=[0]), "valid choices"),
        (Setup(), Protocol(["ste", "ste"], seeds=[0]), "twice"),
    ],
)
def test_bad_comparisons_are_refused_before_anything_runs(setup, protocol, match):
    with pytest.raises(ValueError, match=match):
        check(setup, protocol)
