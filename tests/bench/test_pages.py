"""The docs/results.md sections written from benchmark JSON: the curriculum mechanism table, the
noise-stream table."""

import json

from metaste.bench.pages import curriculum_mechanism, noise_stream


def test_curriculum_mechanism_tabulates_the_flip_rates(tmp_path):
    (tmp_path / "curriculum").mkdir()
    arms = {
        "none": {"loss": [2.0] * 8 + [1.0] * 2, "rho": [1.0] * 10, "flip_rate": [0.0] * 5 + [0.2] * 5},
        "random": {"loss": [0.5] * 10, "rho": [0.5] * 10, "flip_rate": [0.1] * 10},
    }
    record = dict(
        task="mnist-mlp", bits=1, lr=0.4, steps=10, length=0.5, schedule="log", command="cmd", arms=arms
    )
    (tmp_path / "curriculum" / "flips.json").write_text(json.dumps(record))
    lines = curriculum_mechanism(tmp_path, lambda p: str(p))
    assert "| plain STE | 0.1000 | 0.2000 | 1.000 |" in lines  # mean, last quarter (2 steps), last 10 %
    assert "| random | 0.1000 | 0.1000 | 0.500 |" in lines
    assert curriculum_mechanism(tmp_path / "missing", str) == []


def test_noise_stream_lists_each_moved_label_and_counts_changed_verdicts(tmp_path):
    (tmp_path / "noise-stream").mkdir()
    row = lambda label, then, now: dict(  # noqa: E731
        comparison="demo", label=label, baseline="ste", metric="accuracy", then=then, now=now
    )
    rows = [
        row(
            "fogzo",
            dict(lr=0.05, metric=89.5, delta=[0.5, 0.4, "better"]),
            dict(lr=0.1, metric=89.0, delta=[0.0, 0.4, "no difference"]),
        ),
        row(
            "nspsa",
            dict(lr=0.1, metric=80.0, delta=[-9.0, 1.0, "worse"]),
            dict(lr=0.1, metric=81.0, delta=[-8.0, 1.0, "worse"]),
        ),
    ]
    record = dict(against="abc1234", command="python benchmarks/noise_stream.py --against abc1234", rows=rows)
    (tmp_path / "noise-stream" / "moved.json").write_text(json.dumps(record))
    lines = noise_stream(tmp_path)
    assert (
        "| `demo` | `fogzo` | 0.05 → 0.1 | 89.50 → 89.00 (-0.50) | +0.50 ± 0.40 better → +0.00 ± 0.40 no difference |"
        in lines
    )
    text = next(line for line in lines if "`abc1234`" in line)
    assert (
        "The tuned lr moved in 1 of 2; 1 verdict changed: `fogzo` in `demo` (better → no difference)." in text
    )
    assert noise_stream(tmp_path / "missing") == []
