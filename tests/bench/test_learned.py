"""The data collection of ``python -m metaste.bench.learned`` (docs/methods/*.md plots): the keys and
shapes it records on a few steps, and that the recorded values move (not the plotting)."""

from __future__ import annotations

import numpy as np
import pytest

from metaste.bench import data, learned


@pytest.fixture(autouse=True)
def _mnist():
    try:
        data.load_mnist5k()
    except data.DatasetUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(
    "method,keys",
    [
        ("pege", {"ratio": 1, "error": 2}),
        ("jacquant", {k: 2 for k in ("alpha", "alpha_min", "alpha_max", "gamma", "gamma_min", "gamma_max")}),
        ("calibrated", {"a": 2, "lam": 2}),
    ],
)
def test_collect_keys_and_shapes(method, keys):
    out = learned.collect(method, steps=12, every=4)
    assert set(out) == {"step", "accuracy", *keys}
    assert out["step"].tolist() == [0, 4, 8, 12]
    for key, width in keys.items():
        assert out[key].shape == (4, width), key
        assert np.isfinite(out[key]).all()
    assert 0.0 <= float(out["accuracy"]) <= 100.0


def test_collect_records_the_state_as_it_changes():
    pege = learned.collect("pege", steps=12, every=4)
    r = pege["ratio"][:, 0]  # T_r = 6: r(0) = 0, 0 < r(4) < 1, then 1
    assert r[0] == 0.0 and 0.0 < r[1] < 1.0 and r[2:].tolist() == [1.0, 1.0]
    jq = learned.collect("jacquant", steps=2, every=1)
    assert jq["alpha"][0].tolist() == [1.0, 1.0] and jq["alpha"][1].tolist() != [1.0, 1.0]  # fitted at step 0


def test_unknown_method():
    with pytest.raises(ValueError, match="choose one of"):
        learned.collect("fogzo", steps=1)
