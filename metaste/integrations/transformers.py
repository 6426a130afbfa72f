"""HF ``transformers.Trainer`` driving a metaste wrapper (docs/design.md §10.1). Extra ``[hf]``.

The Trainer never passes a closure to ``optimizer.step()``: it runs forward+backward per
micro-batch in ``training_step``, then clips and steps. :class:`MetasteTrainerMixin` keeps the
Trainer's loop and replaces only that: ``training_step`` collects the micro-batches of one
optimizer step, and on the last one runs ``wrapper.step(Accumulated(...))`` — one closure per
micro-batch, each the Trainer's own ``compute_loss`` with the Trainer's loss normalisation
(``num_items_in_batch`` or 1/GA), backward per micro-batch under ``no_sync`` — with the
accelerator's ``GradScaler`` (fp16) and ``args.max_grad_norm`` handed to the wrapper. The
Trainer's later ``optimizer.step()`` is a no-op (:class:`~._driven.DrivenOptimizer`), the logged
``grad_norm`` is the wrapper's pre-clip norm and an fp16 overflow step does not advance the LR
schedule, as in the plain Trainer. Change to a plain Trainer script::

    from metaste.integrations.transformers import MetasteTrainer
    opt = metaste.FOGZO(torch.optim.AdamW(model.parameters(), lr=1e-3), total_steps=args.max_steps)
    trainer = MetasteTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

or keep the Trainer's own optimizer and wrap it: ``MetasteTrainer(..., wrap=lambda o:
metaste.FOGZO(o, total_steps=...))``. Supported: one process or DDP (``torchrun``), fp32 / bf16 /
fp16. Refused with a clear error: DeepSpeed, FSDP, ``DataParallel`` (several GPUs in one
process), SageMaker MP, a Trainer without a metaste wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..optim import Accumulated, OptimizerWrapper
from . import require
from ._driven import DrivenOptimizer, check_wrapper, grad_norm

_tf = require("transformers", "hf", "metaste.integrations.transformers")

__all__ = ["MetasteTrainerMixin", "MetasteTrainer", "SUPPORTED"]

SUPPORTED = (
    "MetasteTrainer(..., optimizers=(metaste.FOGZO(base) or metaste.HyperSTE(base), scheduler or None)) "
    "or MetasteTrainer(..., wrap=lambda base: metaste.FOGZO(base, ...)), on one process or DDP (torchrun), "
    "in fp32, bf16 or fp16"
)


class MetasteTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) to train with a metaste wrapper.

    Args (keywords, besides the Trainer's own):
        optimizers: ``(wrapper, scheduler or None)`` with ``wrapper`` a ``metaste.FOGZO`` /
            ``metaste.HyperSTE``; the scheduler, if ``None``, is the Trainer's (``args``).
        wrap: instead of ``optimizers``, a function ``base optimizer -> wrapper`` applied to the
            optimizer the Trainer builds from ``args`` (its AdamW, weight-decay groups, lr).

    ``self.metaste_optimizer`` is the wrapper. With FOGZO the closures are called 1 + 2n times per
    step (each micro-batch's ``compute_loss`` again under ``no_grad``).
    """

    def __init__(
        self,
        *args: Any,
        optimizers: tuple[Any, Any] = (None, None),
        wrap: Callable[[torch.optim.Optimizer], OptimizerWrapper] | None = None,
        **kwargs: Any,
    ) -> None:
        opt, sched = optimizers
        if wrap is not None and opt is not None:
            raise ValueError(
                "MetasteTrainer takes either optimizers=(wrapper, scheduler) or wrap=..., not both"
            )
        if wrap is None:
            wrapper = check_wrapper(opt, "MetasteTrainer", SUPPORTED)
            opt = DrivenOptimizer(wrapper, "MetasteTrainer")
        elif not callable(wrap):
            raise TypeError(
                f"wrap must be a function base optimizer -> metaste wrapper, got {type(wrap).__name__}"
            )
        self._metaste_wrap = wrap
        self._metaste_micro: list[tuple[dict[str, Any], Any]] = []
        super().__init__(*args, optimizers=(opt, sched), **kwargs)  # type: ignore[call-arg]
        self._metaste_check_setup()

    # -- setup --------------------------------------------------------------------------------

    @property
    def metaste_optimizer(self) -> OptimizerWrapper:
        return self._metaste_driven().wrapper

    def _metaste_driven(self) -> DrivenOptimizer:
        opt = self.optimizer
        while opt is not None and not isinstance(opt, DrivenOptimizer):
            opt = getattr(opt, "optimizer", None)  # accelerate's AcceleratedOptimizer
        if opt is None:
            raise RuntimeError("MetasteTrainer has no optimizer yet (it is built when training starts)")
        return opt

    def _metaste_check_setup(self) -> None:
        bad = None
        if getattr(self, "is_deepspeed_enabled", False):
            bad = "DeepSpeed (it owns backward, loss scaling and the optimizer step)"
        elif getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            bad = "FSDP through the Trainer (use metaste's FSDP2 path in your own loop, docs/design.md §10.4)"
        elif self.args.n_gpu > 1:
            bad = f"DataParallel over {self.args.n_gpu} GPUs in one process (launch one process per GPU: torchrun)"
        elif _tf.utils.is_sagemaker_mp_enabled():
            bad = "SageMaker model parallelism"
        if bad is not None:
            raise ValueError(f"MetasteTrainer cannot run with {bad}. Supported: {SUPPORTED}")

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self._metaste_wrap is not None and self.optimizer is None:
            base = super().create_optimizer(model)  # type: ignore[misc]
            wrapper = check_wrapper(self._metaste_wrap(base), "MetasteTrainer(wrap=...)", SUPPORTED)
            self.optimizer = DrivenOptimizer(wrapper, "MetasteTrainer")
        return self.optimizer

    # -- the step -----------------------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Collect this micro-batch; on the last one of the optimizer step run the wrapper's step
        over all of them. Returns 0 for the collected ones and the step's loss (the sum of the
        normalised micro-batch losses, what the Trainer's own steps add up to) on the last."""
        self._metaste_micro.append((self._prepare_inputs(inputs), num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        micro, self._metaste_micro = self._metaste_micro, []
        driven = self._metaste_driven()
        wrapper = driven.wrapper
        acc_opt = self.optimizer
        scaler = self.accelerator.scaler
        # the wrapper scales, unscales, skips and updates (docs/design.md §5.1), and clips
        wrapper.configure_amp(
            grad_scaler=scaler if scaler is not None else wrapper.grad_scaler,
            max_grad_norm=self.args.max_grad_norm if self.args.max_grad_norm > 0 else None,
        )
        if scaler is not None:
            acc_opt.scaler = None  # accelerate's own scaler.step(optimizer) must not run as well
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        closures = [functools.partial(self._metaste_loss, model, inp, n) for inp, n in micro]
        no_sync = functools.partial(self.accelerator.no_sync, model) if len(micro) > 1 else None
        loss = wrapper.step(Accumulated(closures, weights=[1.0] * len(micro), no_sync=no_sync))
        driven.mark_stepped()
        if hasattr(acc_opt, "_is_overflow"):  # accelerator.optimizer_step_was_skipped → no LR step
            acc_opt._is_overflow = wrapper.last_step_skipped
        return loss.to(self.args.device)

    def _metaste_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> torch.Tensor:
        """One micro-batch's loss exactly as the Trainer's ``training_step`` backpropagates it."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """The wrapper clipped before its base step; report its pre-clip norm."""
        norm = self.metaste_optimizer.last_grad_norm
        return norm if norm is not None else grad_norm(model.parameters())

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # the accelerator's norm would unscale the gradients a second time under fp16
        return grad_norm if grad_norm is not None else _grad_norm(model.parameters())


_grad_norm = grad_norm


class MetasteTrainer(MetasteTrainerMixin, _tf.Trainer):
    """``transformers.Trainer`` that trains with a metaste wrapper (see :class:`MetasteTrainerMixin`)."""
