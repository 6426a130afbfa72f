import dataclasses
import json
import math

import pytest

from metaste import quantized_weights
from metaste.bench import cli, stats
from metaste.bench.compare import compare, format_table
from metaste.bench.methods import METHODS, Method, base_optimizer, register_method
from metaste.bench.tasks import get_task


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
    task = get_task("mnist-mlp")
    kw = dict(steps=30, bits=2, quantizer="lsq", progress=False)
    a = compare(task, ["ste"], [0], **kw)[0]
    b = compare(task, ["ste"], [0], **kw)[0]
    assert a.losses == b.losses and a.final_metric == b.final_metric
    fp = compare(task, ["fp32"], [0], **kw)[0]
    assert fp.bits is None and a.bits == 2  # fp32 is the unquantized reference
    assert fp.losses[0] != a.losses[0]  # ... so its first loss differs, but only by quantization:
    assert math.isclose(fp.losses[0], a.losses[0], rel_tol=0.2)  # same init and first batch


def test_compare_command_writes_table_json_and_png(tmp_path, capsys):
    rc = cli.main(
        [
            "compare",
            "--task",
            "mnist-mlp",
            "--methods",
            "fp32,ste",
            "--seeds",
            "2",
            "--steps",
            "20",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| ste | 2 | 2 |" in printed and "| fp32 | fp32 | 2 |" in printed
    out = tmp_path / "mnist-mlp"
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"fp32", "ste"} and all(len(r["losses"]) == 20 for r in rows)
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "table.md").read_text().startswith("| method |")
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("method,seed,bits,steps,final_loss") and len(csv_rows) == 1 + 4


def test_list_methods_prints_every_registered_method(capsys):
    assert cli.main(["compare", "--list-methods"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in METHODS)


def test_a_method_registered_later_runs_through_the_command(tmp_path, capsys):
    seen = {}

    def build(model, ctx):
        seen["surrogates"] = {e.surrogate.name for _, e in quantized_weights(model)}
        seen["extra"] = ctx.extra
        return base_optimizer(model, dataclasses.replace(ctx, lr=ctx.lr / 2))

    register_method(Method("test-half-lr", "plain STE at half the learning rate", {}, build))
    try:
        argv = [
            "compare",
            "--methods",
            "ste,test-half-lr",
            "--seeds",
            "1",
            "--steps",
            "5",
            "--out",
            str(tmp_path),
        ]
        assert cli.main(argv + ["--surrogate", "pwl", "--method-opt", "foo=3", "--no-progress"]) == 0
    finally:
        del METHODS["test-half-lr"]
    assert "| test-half-lr | 2 | 1 |" in capsys.readouterr().out
    assert seen == {"surrogates": {"pwl"}, "extra": {"foo": 3}}


def test_unknown_method_is_rejected_with_the_valid_choices():
    with pytest.raises(ValueError, match="valid choices"):
        compare(get_task("mnist-mlp"), ["sgd-magic"], [0], steps=1, bits=2, quantizer="lsq", progress=False)


def test_table_reports_the_task_metric():
    task = get_task("mnist-mlp")
    res = compare(task, ["ste"], [0, 1], steps=10, bits=2, quantizer="lsq", progress=False)
    assert "test acc. (%)" in format_table(task, res)
