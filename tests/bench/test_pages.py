"""The docs/results.md sections written from benchmark JSON: the curriculum mechanism table."""

import json

from metaste.bench.pages import curriculum_mechanism


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
