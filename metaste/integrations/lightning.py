"""PyTorch Lightning with a metaste wrapper (docs/design.md §10.2). Extra ``[lightning]``.

A method that needs one forward per step (HyperSTE ``analytical``/``delayed``, PEGE, JacQuant,
Calibrated without probes) needs nothing from this module: return it from
``configure_optimizers`` of a plain LightningModule and Lightning's automatic optimisation drives
it, ``gradient_clip_val``, ``accumulate_grad_batches`` and ``16-mixed`` included. This mixin is for
the methods that need the closure again (FOGZO, the horizon methods).

Lightning's automatic optimisation runs backward itself and its AMP plugin calls the closure and
then ``scaler.step(optimizer)`` without it, so :class:`MetasteModule` switches the module to
manual optimisation and runs each training step as ``wrapper.step(closure)``, where the closure
is the module's own ``training_step`` on the batch. Change to a LightningModule::

    class Model(MetasteModule, L.LightningModule):                 # (1) add the mixin
        def training_step(self, batch, batch_idx): ...             # unchanged: return the loss
        def configure_optimizers(self):
            return metaste.FOGZO(torch.optim.SGD(self.parameters(), lr=0.1), total_steps=1000)  # (2)

The mixin hands the precision plugin's ``GradScaler`` (``precision="16-mixed"``) to the wrapper,
keeps ``trainer.global_step`` counting, steps the LR schedulers of ``configure_optimizers`` as
the automatic loop would (``interval`` ``"step"``/``"epoch"``, ``frequency``; not after a skipped
fp16 step), and logs only from the first call of the closure in a step (FOGZO calls it 1 + 2n
times). Supported: one device (CPU or one GPU), fp32 / bf16-mixed / 16-mixed, one optimizer.
Refused with a clear error: other strategies (DDP, FSDP, DeepSpeed), several optimizers, an
optimizer that is not a metaste wrapper. Lightning itself refuses ``gradient_clip_val`` and
``accumulate_grad_batches`` with manual optimisation: with the mixin, pass ``max_grad_norm=`` to the
wrapper and accumulate with :class:`metaste.Accumulated` inside ``training_step`` if needed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from . import require
from ._driven import check_wrapper

_L = require("lightning.pytorch", "lightning", "metaste.integrations.lightning")

__all__ = ["MetasteModule", "SUPPORTED"]

SUPPORTED = (
    "class Model(MetasteModule, L.LightningModule) whose configure_optimizers returns one metaste.FOGZO / "
    "metaste.HyperSTE (optionally with an lr_scheduler), trained on one device (CPU or one GPU) in "
    "32-true, bf16-mixed or 16-mixed precision"
)


class MetasteModule:
    """Mixin (put it before ``LightningModule``): the module's ``training_step`` becomes the closure
    of the metaste wrapper that ``configure_optimizers`` returns. See the module docstring."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_metaste_driven", False):

            @functools.wraps(step)
            def training_step(self: Any, *args: Any, **kw: Any) -> Any:
                return self._metaste_step(step, args, kw)

            training_step._metaste_driven = True  # type: ignore[attr-defined]
            cls.training_step = training_step  # type: ignore[attr-defined]

    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError(
                "a MetasteModule trains with manual optimisation (the metaste wrapper runs backward "
                "itself); do not set automatic_optimization = True"
            )

    # -- the step -----------------------------------------------------------------------------

    def _metaste_step(self, step: Any, args: tuple, kwargs: dict) -> Any:
        if getattr(self, "_metaste_calls", None) is not None:  # a subclass calling super().training_step
            return step(self, *args, **kwargs)
        trainer = self.trainer
        lopt = self._metaste_optimizer(trainer)
        wrapper = lopt.optimizer
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            wrapper.configure_amp(grad_scaler=scaler, max_grad_norm=wrapper.max_grad_norm)
        first: list[Any] = []

        def closure() -> torch.Tensor:
            calls = self._metaste_calls
            self._metaste_calls = calls + 1
            out = step(self, *args, **kwargs)
            if calls == 0:
                first.append(out)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    "a MetasteModule's training_step must return the loss (a tensor, or a dict with "
                    f"'loss'): it is the metaste wrapper's closure; got {type(out).__name__}"
                )
            return loss

        self._metaste_calls = 0
        lopt._on_before_step()  # Lightning's optimizer-step bookkeeping (trainer.global_step)
        try:
            wrapper.step(closure)
        finally:
            self._metaste_calls = None
            lopt._on_after_step()
        if not wrapper.last_step_skipped:
            self._metaste_update_schedulers("step", trainer.fit_loop.epoch_loop.batch_idx + 1)
        return first[0] if first else None

    def _metaste_optimizer(self, trainer: Any) -> Any:
        if not isinstance(trainer.strategy, _L.strategies.SingleDeviceStrategy):
            raise ValueError(
                f"MetasteModule cannot run under the {type(trainer.strategy).__name__} strategy (it would "
                f"have to own backward and the gradient sync). Supported: {SUPPORTED}"
            )
        opts = self.optimizers(use_pl_optimizer=True)
        if isinstance(opts, list):
            if len(opts) != 1:
                raise ValueError(
                    f"MetasteModule trains one optimizer, got {len(opts)}. Supported: {SUPPORTED}"
                )
            opts = opts[0]
        check_wrapper(opts.optimizer, "MetasteModule (configure_optimizers)", SUPPORTED)
        return opts

    def _metaste_update_schedulers(self, interval: str, index: int) -> None:
        """What Lightning's automatic loop does for the schedulers of ``configure_optimizers``."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or index % config.frequency != 0:
                continue
            monitor = None
            if config.reduce_on_plateau:
                monitor = self.trainer.callback_metrics.get(config.monitor)
                if monitor is None:
                    continue
            self.lr_scheduler_step(config.scheduler, monitor)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        self._metaste_update_schedulers("epoch", self.trainer.current_epoch + 1)

    # -- logging: only the first closure call of a step logs -----------------------------------

    def _metaste_quiet(self) -> bool:
        calls = getattr(self, "_metaste_calls", None)
        return calls is not None and calls > 1

    def log(self, *args: Any, **kwargs: Any) -> None:
        if not self._metaste_quiet():
            super().log(*args, **kwargs)  # type: ignore[misc]

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        if not self._metaste_quiet():
            super().log_dict(*args, **kwargs)  # type: ignore[misc]
