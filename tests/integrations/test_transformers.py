"""HF transformers.Trainer driving metaste wrappers (metaste.integrations.transformers): a tiny
LlamaForCausalLM built from a config (no download) on KJV text, 10 optimizer steps with gradient
accumulation, clipping, an LR schedule and (bf16) mixed precision: the Trainer's loss sequence
and final weights equal the plain metaste loop's."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'metaste[hf]'")
pytest.importorskip("accelerate", reason="needs the [hf] extra (accelerate): pip install 'metaste[hf]'")

import metaste  # noqa: E402
from metaste.bench.data import DatasetUnavailable, load_kjv  # noqa: E402
from metaste.integrations.transformers import MetasteTrainer  # noqa: E402

STEPS, BATCH, SEQ = 10, 2, 24


def kjv_samples(n: int) -> list[dict[str, torch.Tensor]]:
    try:
        corpus = load_kjv()
    except DatasetUnavailable as err:
        pytest.skip(str(err))
    ids = corpus.train[: n * SEQ].view(n, SEQ)
    return [{"input_ids": row.clone(), "labels": row.clone()} for row in ids]


def tiny_llama(vocab: int = 63) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    return metaste.quantize_model(model, bits=4, surrogate="slste", inplace=True)


METHODS = {
    "fogzo": lambda p: metaste.FOGZO(torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0), total_steps=STEPS),
    "delayed": lambda p: metaste.HyperSTE(
        torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0), method="delayed", hyper_lr=0.05
    ),
}


def args(tmp_path, ga: int, bf16: bool, **kw):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ga,
        lr_scheduler_type="linear",
        max_grad_norm=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**settings, **kw})


def record_losses(wrapper, out: list):
    step = wrapper.step

    def recording(closure):
        loss = step(closure)
        out.append(loss.item())
        return loss

    wrapper.step = recording


def plain_loop(method: str, data, ga: int, bf16: bool, scaler=None):
    """What a user writes without the Trainer: the same micro-batches, the model's own loss
    normalised by the step's token count, clipping and the linear schedule."""
    model = tiny_llama()
    opt = METHODS[method](model.parameters())
    opt.max_grad_norm = 0.5
    opt.grad_scaler = scaler
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    losses = []

    def micro_loss(mb, n):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=mb["input_ids"], labels=mb["labels"], num_items_in_batch=n).loss

    for step in range(STEPS):
        rows = data[step * BATCH * ga : (step + 1) * BATCH * ga]
        micro = [
            {k: torch.stack([r[k] for r in rows[i : i + BATCH]]) for k in rows[0]}
            for i in range(0, len(rows), BATCH)
        ]
        n = sum(mb["labels"][..., 1:].ne(-100).sum() for mb in micro)
        closures = [lambda mb=mb, n=n: micro_loss(mb, n) for mb in micro]
        losses.append(opt.step(metaste.Accumulated(closures, weights=[1.0] * len(micro))).item())
        if not opt.last_step_skipped:
            sched.step()
    return losses, model


@pytest.mark.parametrize(
    "method,ga,bf16", [("fogzo", 2, False), ("delayed", 2, False), ("fogzo", 1, True), ("delayed", 2, True)]
)
def test_trainer_equals_the_plain_metaste_loop(method, ga, bf16, tmp_path):
    data = kjv_samples(STEPS * BATCH * ga)
    ref_losses, ref_model = plain_loop(method, data, ga, bf16)

    model = tiny_llama()
    opt = METHODS[method](model.parameters())
    losses: list[float] = []
    record_losses(opt, losses)
    trainer = MetasteTrainer(
        model=model, args=args(tmp_path, ga, bf16), train_dataset=data, optimizers=(opt, None)
    )
    trainer.train()

    assert losses == ref_losses
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(ref_losses, rel=1e-6)
    norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(norms) == STEPS and max(norms) > 0.5  # the clip acted at least once
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert trainer.metaste_optimizer is opt


def test_the_accelerators_grad_scaler_is_driven_by_the_wrapper(tmp_path):
    """fp16 needs a GPU in accelerate; on CPU the accelerator's scaler is set by hand (fp32 compute,
    a scale so large that the first steps overflow): skipped steps skip the LR schedule too, and
    accelerate's own scaler.step never runs (it would raise on the wrapper)."""
    data = kjv_samples(STEPS * BATCH * 2)
    mk = lambda: torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=2)  # noqa: E731
    ref_losses, ref_model = plain_loop("delayed", data, 2, False, scaler=mk())

    model = tiny_llama()
    opt = METHODS["delayed"](model.parameters())
    losses: list[float] = []
    record_losses(opt, losses)
    skipped = []
    trainer = MetasteTrainer(
        model=model, args=args(tmp_path, 2, False), train_dataset=data, optimizers=(opt, None)
    )
    trainer.accelerator.scaler = scaler = mk()
    trainer.add_callback(_Skips(skipped, trainer))
    trainer.train()
    assert any(skipped) and not all(skipped)
    assert losses == ref_losses
    assert opt.grad_scaler is scaler and trainer.optimizer.scaler is None
    for v, v2 in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(v, v2)


class _Skips(transformers.TrainerCallback):
    def __init__(self, out, trainer):
        self.out, self.trainer = out, trainer

    def on_step_end(self, args, state, control, **kw):
        self.out.append(self.trainer.accelerator.optimizer_step_was_skipped)


@pytest.mark.parametrize("method", ["fogzo", "delayed"])
def test_a_run_resumed_from_a_checkpoint_continues_like_the_uninterrupted_run(method, tmp_path):
    """save_steps=5 of 10: the run resumed from checkpoint-5 (a fresh model and wrapper; the
    wrapper's state comes back from state_dict()["metaste"], θ with the model's weights; delayed:
    in the middle of a window) logs the same losses and ends with the same weights."""
    data = kjv_samples(STEPS * BATCH)

    def run(resume: str | None):
        model = tiny_llama()
        opt = METHODS[method](model.parameters())
        losses: list[float] = []
        record_losses(opt, losses)
        kw = dict(save_strategy="steps", save_steps=5, save_only_model=False)
        trainer = MetasteTrainer(
            model=model, args=args(tmp_path, 1, False, **kw), train_dataset=data, optimizers=(opt, None)
        )
        trainer.train(resume_from_checkpoint=resume)
        return losses, model, opt

    ref_losses, ref_model, ref_opt = run(None)
    losses, model, opt = run(str(tmp_path / "checkpoint-5"))
    assert len(ref_losses) == STEPS and losses == ref_losses[5:]
    assert opt.steps == ref_opt.steps == STEPS
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    if method == "delayed":
        a = [t for _, t in metaste.surrogate_parameters(model)]
        assert not all(torch.equal(t, torch.ones_like(t)) for t in a)  # θ was learned


def test_wrap_applies_to_the_optimizer_the_trainer_builds(tmp_path):
    data = kjv_samples(4 * BATCH)
    model = tiny_llama()
    seen = []

    def wrap(base):
        seen.append(base)
        return metaste.FOGZO(base, total_steps=4)

    trainer = MetasteTrainer(
        model=model, args=args(tmp_path, 1, False, max_steps=4), train_dataset=data, wrap=wrap
    )
    trainer.train()
    assert isinstance(trainer.metaste_optimizer, metaste.FOGZO)
    assert trainer.metaste_optimizer.steps == 4 and trainer.metaste_optimizer.optimizer is seen[0]


def test_a_trainer_without_a_metaste_wrapper_is_refused(tmp_path):
    model = tiny_llama()
    data = kjv_samples(4)
    with pytest.raises(TypeError, match="metaste.FOGZO / metaste.HyperSTE.*Supported"):
        MetasteTrainer(model=model, args=args(tmp_path, 1, False), train_dataset=data)
    base = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="got AdamW"):
        MetasteTrainer(
            model=model, args=args(tmp_path, 1, False), train_dataset=data, optimizers=(base, None)
        )


def test_deepspeed_is_refused(tmp_path, monkeypatch):
    model = tiny_llama()
    opt = METHODS["fogzo"](model.parameters())
    monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess", _fake_deepspeed)
    with pytest.raises(ValueError, match="DeepSpeed.*Supported"):
        MetasteTrainer(
            model=model, args=args(tmp_path, 1, False), train_dataset=kjv_samples(4), optimizers=(opt, None)
        )


def _fake_deepspeed(self):
    _real_create(self)
    self.is_deepspeed_enabled = True


_real_create = transformers.Trainer.create_accelerator_and_postprocess


def test_the_plain_trainer_drives_a_one_forward_wrapper(tmp_path):
    """No adapter: the plain ``transformers.Trainer`` (its own backward per micro-batch, clipping,
    then ``optimizer.step()``) trains with HyperSTE(method="delayed") as it would with AdamW: the
    wrapper steps once per optimizer step and the loss goes down."""
    data = kjv_samples(STEPS * BATCH * 2)
    model = tiny_llama()
    theta0 = [t.clone() for _, t in metaste.quant.surrogate_parameters(model)]
    opt = METHODS["delayed"](model.parameters())
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, 2, False), train_dataset=data, optimizers=(opt, None)
    )
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert opt.steps == STEPS and result.global_step == STEPS
    theta = [t for _, t in metaste.quant.surrogate_parameters(model)]
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta))  # θ learned from the Trainer's gradients
    assert losses[-1] < losses[0]
