"""The float model of ``--init float``: deterministic, cached, and never used when the cache is
corrupt or stale."""

import math

import pytest
import torch

from metaste.bench import pretrain
from metaste.bench.runner import RunSpec, run_one
from metaste.bench.tasks import get_task
from metaste.quant.layers import QuantLayer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METASTE_CACHE", str(tmp_path))


def _task():
    return get_task("digits-mlp")


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_float_model_is_trained_once_then_loaded(monkeypatch):
    first = pretrain.float_weights(_task(), "cpu", 0)
    files = list(pretrain.cache_dir().glob("*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(pretrain, "_train", lambda *a: pytest.fail("a cached model was trained again"))
    assert _equal(pretrain.float_weights(_task(), "cpu", 0), first)


def test_the_float_model_is_deterministic_and_trained():
    a = pretrain.float_weights(_task(), "cpu", 3)
    for f in pretrain.cache_dir().glob("*.pt"):
        f.unlink()
    assert _equal(pretrain.float_weights(_task(), "cpu", 3), a)  # rebuilt: the same bits
    model = _task().model(3)
    before = _task().evaluate(model)
    model.load_state_dict(a)
    assert _task().evaluate(model) > before + 20  # trained, not the random init


def test_seed_and_holdout_are_part_of_the_key():
    a = pretrain.float_weights(_task(), "cpu", 0)
    assert not _equal(pretrain.float_weights(_task(), "cpu", 1), a)
    assert not _equal(pretrain.float_weights(_task(), "cpu", 0, holdout=True), a)
    assert len(list(pretrain.cache_dir().glob("*.pt"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key", "other weights"])
def test_a_damaged_or_stale_cache_file_is_rebuilt_not_used(damage):
    good = pretrain.float_weights(_task(), "cpu", 0)
    (path,) = pretrain.cache_dir().glob("*.pt")
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        blob = torch.load(path, weights_only=True)
        if damage == "other key":
            blob["key"] = blob["key"].replace('"seed": 0', '"seed": 1')
        else:
            blob["state"] = {k: v + 1 for k, v in blob["state"].items()}
        torch.save(blob, path)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = pretrain.float_weights(_task(), "cpu", 0)
    assert _equal(again, good)
    assert pretrain._load(path, pretrain.cache_key(_task(), "cpu", 0, holdout=False)) is not None


def test_a_pickled_object_in_the_cache_is_refused(tmp_path):
    """weights_only=True: a file that would run code on load is not loaded (and gets rebuilt)."""
    pretrain.float_weights(_task(), "cpu", 0)
    (path,) = pretrain.cache_dir().glob("*.pt")
    torch.save({"key": object()}, path)
    with pytest.warns(UserWarning, match="unreadable"):
        pretrain.float_weights(_task(), "cpu", 0)


def test_init_float_starts_every_method_from_the_trained_float_model():
    spec = lambda m, init: RunSpec("digits-mlp", m, m, 0, 0.1, 5, 2, "lsq", init=init)  # noqa: E731
    scratch, warm = run_one(spec("ste", "scratch")), run_one(spec("ste", "float"))
    assert warm.losses[0] < scratch.losses[0] - 1.0  # a trained start
    fp = run_one(spec("fp32", "float"))
    assert fp.losses[0] < warm.losses[0]  # the float model itself, unquantized, fits better
    assert math.isfinite(warm.final_metric) and warm.final_metric > 80


def test_init_float_quantizes_the_loaded_weights():
    task = _task()
    model = pretrain.load_float(task.model(0), task, "cpu", 0)
    from metaste.quant.convert import quantize_model

    q = quantize_model(model, bits=2)
    layer = next(m for m in q.modules() if isinstance(m, QuantLayer))
    assert torch.equal(layer.weight, model.get_submodule("1").weight)
