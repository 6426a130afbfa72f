"""The ``metaste`` command: outputs, method variants, argparse-style errors."""

import dataclasses
import json

import pytest

from metaste import quantized_weights
from metaste.bench import cli
from metaste.bench.registry import METHODS, Method, base_optimizer, parse_method, register_method

FAST = ["--task", "digits-mlp", "--seeds", "2", "--steps", "12", "--workers", "1"]


def test_compare_prints_the_verdict_table_and_writes_json_and_png(tmp_path, capsys):
    argv = ["compare", "--methods", "ste,ste-identity,fogzo", "--tune-lr", "0.05,0.1", "--out", str(tmp_path)]
    assert cli.main(argv + FAST) == 0
    printed = capsys.readouterr().out
    assert "baseline (**best STE**): `ste" in printed and "verdict (equal steps)" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["`ste`", "`ste-identity`", "`fogzo`"]
    assert sum("(baseline)" in r for r in rows) == 1
    verdicts = {"better", "worse", "no difference"}
    assert all(any(v in r for v in verdicts) for r in rows if "(baseline)" not in r)
    out = tmp_path / "digits-mlp"
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["setup"]["bits"] == 2 and comp["baseline"] in ("ste", "ste-identity")
    assert len(comp["runs"]) == 3 * 2 and len(comp["tuning"]) >= 3 * 2 * 3
    assert comp["compute_steps"]["fogzo"] == 20  # 12 · 5 / 3
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "table.md").read_text().startswith("task `digits-mlp`")


def test_quant_opt_cannot_relabel_the_bits(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--quant-opt", "bits=3"] + FAST)
    assert e.value.code == 2 and "--bits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--methods", "ste,magic"], "valid choices"),
        (["--method-opt", "beta_min=0.9"], "read by none"),
        (["--quant-opt", "surogate=pwl"], "valid keys"),
        (["--tune-lr", ","], "empty"),
        (["--tune-seeds", "0,1"], "overlap"),
        (["--tune-lr", "a,b"], "comma-separated numbers"),
        (["--task", "imagenet"], "invalid choice"),
        (["--workers", "0"], "--workers"),
        (["--bits", "0"], "1 <= bits <= 16"),
        (["--methods", "ste,fogzo[n=0]"], "Invalid n: 0"),
        (["--methods", "ste-float[float_frac=1.5]"], "float_frac must lie in [0, 1]"),
        (["--methods", "ste,fogzo", "--tune", "n=1,0"], "Invalid n: 0"),  # every setting of a grid
        (["--init", "warm"], "invalid choice"),
        (["--out", "/proc/no/such/folder"], "cannot write there"),
    ],
)
def test_bad_arguments_are_argparse_errors_naming_the_choices(extra, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare"] + FAST + extra)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_steps_zero_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--task", "digits-mlp", "--steps", "0"])
    assert "steps must be ≥ 1" in capsys.readouterr().err


def test_method_variants_fix_options_and_split_on_top_level_commas():
    assert cli._split_methods("ste,fogzo[n=2,beta_min=0.9],nspsa") == [
        "ste",
        "fogzo[n=2,beta_min=0.9]",
        "nspsa",
    ]
    assert parse_method("fogzo[ste_fraction=0.7]") == ("fogzo", {"ste_fraction": 0.7})
    ctx_equiv = METHODS["fogzo"].fwd_equiv
    from metaste.bench.registry import RunContext

    assert ctx_equiv(RunContext("sgd", 0.1, 10, 0, extra={"ste_fraction": 0.7})) == pytest.approx(3.6)


def test_list_methods_prints_every_registered_method_with_its_options(capsys):
    assert cli.main(["compare", "--list-methods"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in METHODS)
    assert "beta_min" in printed


def test_a_method_registered_later_runs_through_the_command(tmp_path, capsys):
    seen = {}

    def build(model, ctx):
        seen["surrogates"] = {e.surrogate.name for _, e in quantized_weights(model)}
        seen["extra"] = ctx.extra
        return base_optimizer(model, dataclasses.replace(ctx, lr=ctx.lr / 2))

    register_method(Method("test-half-lr", "plain STE at half the lr", {}, build, options=("foo",)))
    try:
        argv = ["compare", "--methods", "ste,test-half-lr", "--out", str(tmp_path), "--surrogate", "pwl"]
        assert cli.main(argv + FAST + ["--method-opt", "foo=3"]) == 0
    finally:
        del METHODS["test-half-lr"]
    assert "| `test-half-lr` |" in capsys.readouterr().out
    assert seen == {"surrogates": {"pwl"}, "extra": {"foo": 3}}


def test_a_suite_entry_that_does_not_exist_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--suite", "hyperste", "--only", "hyperste-mnist-3bit"])
    assert e.value.code == 2 and "hyperste-mnist-2bit-channel" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--device", "cuda"] + FAST)
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_workers_end_when_the_compare_process_is_killed(tmp_path):
    """A SIGKILL leaves the pool no chance to shut down: the workers notice their parent is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "from metaste.bench.runner import RunSpec, run_all\n"
        "specs = [RunSpec('digits-mlp', 'ste', 'ste', s, 0.1, 10**6, 2, 'lsq') for s in range(2)]\n"
        "run_all(specs, workers=2, log=lambda line: None)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)

    def children():
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    deadline = time.time() + 60
    while len(children()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = children()
    assert workers, "the pool never started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    # generous: on a loaded machine a worker may still be importing torch when its parent dies,
    # and its watch starts only after that
    deadline = time.time() + 120
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and _not_zombie(p)]
    assert not alive, f"workers {alive} outlived the killed parent"


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
