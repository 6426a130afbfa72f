"""The one-screen answer: one row per set-up; comparisons whose STE family has a float phase
outrank those without; the cells are the Δ that report.deltas computes."""

import pytest

from metaste.bench.answer import answer_rows, answer_table, baseline_spread
from metaste.bench.compare import Protocol, Setup, compare
from metaste.bench.report import deltas

pytest.importorskip("torchao.prototype.parq")


@pytest.fixture(scope="module")
def comps():
    run = lambda methods, first: compare(  # noqa: E731
        Setup("digits-mlp", steps=8),
        Protocol(methods, seeds=[first, first + 1, first + 2], tune_seeds=[100], tune_lr=[0.1]),
        log=lambda _: None,
    )
    old = run(["ste", "ste-identity", "fogzo"], 0)
    new = run(["ste", "ste-float", "pege", "parq-hard"], 3)
    other = compare(
        Setup("digits-mlp", steps=8, optimizer="adam", lr=0.01),
        Protocol(["ste", "jacquant"], [0, 1]),
        log=print,
    )
    return old, new, other


def test_one_row_per_set_up_and_the_float_phase_family_outranks(comps):
    old, new, other = comps
    rows = [answer_rows("old", old), answer_rows("new", new), answer_rows("adam", other)]
    lines = [line for line in answer_table(rows).splitlines() if line.startswith("| digits")]
    assert len(lines) == 2  # SGD and Adam
    sgd = next(line for line in lines if ", sgd," in line)
    assert "`new`" in sgd and "`old`" not in sgd  # only the comparison with ste-float counts
    d = deltas(new, "pege")["metric"]
    assert f"`pege` {d.mean:+.2f} ± {d.half:.2f} → **{d.verdict}**" in sgd
    p = deltas(new, "parq-hard")["metric"]
    assert f"`parq-hard` {p.mean:+.2f} ± {p.half:.2f}" in sgd
    assert f"{baseline_spread(new):.2f}" in sgd
    adam = next(line for line in lines if ", adam," in line)
    assert "family without a float phase" in adam and adam.rstrip().endswith("| — |")


def test_without_a_float_phase_anywhere_every_comparison_counts(comps):
    old, _, _ = comps
    rows = [answer_rows("a", old), answer_rows("b", old)]
    (line,) = [x for x in answer_table(rows).splitlines() if x.startswith("| digits")]
    assert (
        "`a`, `b`" in line and "(0 of 2 comparisons better)" in line or "(2 of 2" in line or "(1 of 2" in line
    )


def test_a_set_up_from_a_float_model_needs_no_float_phase_in_its_family(comps):
    _, _, other = comps
    import copy

    from_float = copy.deepcopy(other)
    from_float.setup = {**from_float.setup, "init": "float"}
    (line,) = [
        x for x in answer_table([answer_rows("f", from_float)]).splitlines() if x.startswith("| digits")
    ]
    assert "from float" in line and "family without a float phase" not in line
