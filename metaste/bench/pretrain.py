"""The float model of ``--init float``: QAT the way practitioners run it, from a trained float
model rather than from a random initialisation.

:func:`float_weights` trains the task's float model for one seed with the task's own optimizer,
learning rate and step count (on the training set, without the validation part for tuning
runs), and caches the result on disk so that every method and every suite of a seed starts
from the same float weights without training them again. The cache key holds the task, scale,
seed, step count, optimizer settings, whether the validation part was held out, the torch
version and a hash of the code that defines the task (tasks, models, data, this file); a file
is loaded with ``weights_only=True`` and used only if its key matches and its tensors'
checksum verifies. Anything else (a corrupt, truncated or stale file) is rebuilt, never used.
Concurrent workers asking for the same model wait on a file lock, so it is trained once.

The float run is deterministic (one thread, seeded init and batch order): the same key always
gives the same weights, whether it was cached or not.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .registry import RunContext, base_optimizer
from .tasks import Task

__all__ = ["float_weights", "cache_dir", "cache_key"]

_FLOAT_SEED_OFFSET = 50_000  # the float run's batch stream is not the fine-tuning run's
_CODE_FILES = ("tasks.py", "models.py", "data.py", "pretrain.py")


def cache_dir() -> Path:
    """``$METASTE_CACHE`` or ``~/.cache/metaste``, then ``float/``."""
    root = os.environ.get("METASTE_CACHE") or Path.home() / ".cache" / "metaste"
    return Path(root) / "float"


def _code_version() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def cache_key(task: Task, scale: str, seed: int, *, holdout: bool) -> dict:
    """Everything the float weights depend on."""
    return dict(
        task=task.name,
        scale=scale,
        seed=seed,
        steps=task.steps,
        optimizer=task.optimizer,
        lr=task.lr,
        momentum=task.momentum,
        weight_decay=task.weight_decay,
        batch_size=task.batch_size,
        holdout=holdout,
        torch=torch.__version__,
        code=_code_version(),
    )


def _checksum(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train(task: Task, seed: int, holdout: bool) -> dict[str, Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = task.model(seed)
        opt = base_optimizer(
            model, RunContext(task.optimizer, task.lr, task.steps, seed, task.weight_decay, task.momentum)
        )
        model.train()
        for batch in task.batches(_FLOAT_SEED_OFFSET + seed, task.steps, holdout=holdout):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the float model of {task.name} seed {seed} diverged")
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def _load(path: Path, key: dict) -> dict[str, Tensor] | None:
    """The cached weights, or None when the file is missing, unreadable or not this key's."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(blob, dict)
            and json.loads(blob.get("key", "null")) == key
            and _checksum(blob["state"]) == blob.get("checksum")
        )
    except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt
        warnings.warn(
            f"float-model cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", stacklevel=3
        )
        return None
    if not ok:
        warnings.warn(
            f"float-model cache {path} does not match its key or checksum; rebuilding it", stacklevel=3
        )
        return None
    return blob["state"]


def float_weights(task: Task, scale: str, seed: int, *, holdout: bool = False) -> dict[str, Tensor]:
    """The float ``state_dict`` of ``task``'s model for ``seed`` after the task's float training
    (see the module docstring), from the cache or trained now and cached."""
    key = cache_key(task, scale, seed, holdout=holdout)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}-s{seed}-{digest}.pt"
    with open(folder / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _load(path, key)
        if state is None:
            state = _train(task, seed, holdout)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"key": json.dumps(key), "state": state, "checksum": _checksum(state)}, tmp)
            os.replace(tmp, path)
    return state


def load_float(model: nn.Module, task: Task, scale: str, seed: int, *, holdout: bool = False) -> nn.Module:
    """Load the float weights of ``seed`` into ``model`` (the task's float model) in place."""
    model.load_state_dict(float_weights(task, scale, seed, holdout=holdout))
    return model
