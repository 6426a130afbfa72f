"""Lightning with metaste wrappers (metaste.integrations.lightning): a LightningModule that adds the
MetasteModule mixin trains 10 steps equal to the plain metaste loop (LR schedule included), in
fp32 and in 16-mixed with the precision plugin's GradScaler (overflow steps included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.integration import assert_same_tensors, batches, mlp, tensors_of

L = pytest.importorskip(
    "lightning.pytorch", reason="needs the [lightning] extra: pip install 'metaste[lightning]'"
)

import metaste  # noqa: E402
from metaste.integrations.lightning import MetasteModule  # noqa: E402

STEPS = 10

METHODS = {
    "fogzo": (
        "identity",
        lambda p: metaste.FOGZO(torch.optim.SGD(p, lr=0.1, momentum=0.9), total_steps=STEPS),
    ),
    "analytical": ("slste", lambda p: metaste.HyperSTE(torch.optim.SGD(p, lr=0.1), method="analytical")),
    "delayed": (
        "slste",
        lambda p: metaste.HyperSTE(torch.optim.Adam(p, lr=1e-2), method="delayed", window=3),
    ),
}


def schedule(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


class Lit(MetasteModule, L.LightningModule):
    def __init__(self, method: str, fp16: bool = False) -> None:
        super().__init__()
        self.method, self.fp16 = method, fp16
        self.net = mlp(surrogate=METHODS[method][0])
        self.logged: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        opt = METHODS[self.method][1](self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule(opt), "interval": "step"}}


class Recorder(L.Callback):
    def __init__(self):
        self.losses, self.logged, self.lrs = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.logged.append(trainer.callback_metrics["train_loss"].item())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def quiet_trainer(**kw):
    """A CPU Trainer for STEPS steps without logger, checkpoints or progress output."""
    return L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def fit(module, data, plugins=()):
    rec = Recorder()
    loader = torch.utils.data.DataLoader(list(data), batch_size=None, shuffle=False)
    trainer = quiet_trainer(callbacks=[rec], plugins=list(plugins))
    trainer.fit(module, loader)
    return trainer, rec


def plain_loop(method, data, scaler=None):
    model = mlp(surrogate=METHODS[method][0])
    opt = METHODS[method][1](model.parameters())
    opt.grad_scaler = scaler
    sched = schedule(opt)
    losses, lrs = [], []
    for x, y in data:

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                return F.cross_entropy(model(x), y)

        losses.append(opt.step(closure).item())
        if not opt.last_step_skipped:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return losses, lrs, model


@pytest.mark.parametrize("method", list(METHODS))
def test_lightning_module_equals_the_plain_metaste_loop(method):
    data = batches(STEPS)
    ref_losses, ref_lrs, ref_model = plain_loop(method, data)
    module = Lit(method)
    trainer, rec = fit(module, data)
    assert trainer.global_step == STEPS
    assert rec.losses == ref_losses
    assert rec.logged == ref_losses  # the clean pass logged, not FOGZO's perturbed passes
    assert rec.lrs == ref_lrs and ref_lrs[-1] < ref_lrs[0]
    assert_same_tensors(tensors_of(module.net), tensors_of(ref_model))


@pytest.mark.parametrize("method", ["fogzo", "analytical"])
def test_mixed_uses_the_precision_plugins_scaler(method):
    from lightning.pytorch.plugins.precision import MixedPrecision

    mk = lambda: torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)  # noqa: E731
    data = batches(STEPS)
    ref_losses, ref_lrs, ref_model = plain_loop(method, data, scaler=mk())
    module = Lit(method, fp16=True)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=mk())
    trainer, rec = fit(module, data, plugins=[plugin])
    wrapper = trainer.optimizers[0]
    assert wrapper.grad_scaler is plugin.scaler
    assert rec.losses == ref_losses
    assert rec.lrs == ref_lrs  # no LR step after a skipped (overflow) step
    assert len(set(ref_lrs)) > 1 and ref_lrs.count(ref_lrs[0]) > 3  # skips happened, then steps
    assert_same_tensors(tensors_of(module.net), tensors_of(ref_model))


def test_a_plain_optimizer_or_two_optimizers_are_refused():
    class Plain(Lit):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="metaste.FOGZO / metaste.HyperSTE.*Supported"):
        fit(Plain("fogzo"), batches(2))

    class Two(Lit):
        def configure_optimizers(self):
            return [
                METHODS["fogzo"][1](self.net[0].parameters()),
                METHODS["fogzo"][1](self.net[2].parameters()),
            ]

    with pytest.raises(ValueError, match="one optimizer, got 2"):
        fit(Two("fogzo"), batches(2))


def test_automatic_optimization_cannot_be_switched_back_on():
    module = Lit("fogzo")
    assert module.automatic_optimization is False
    with pytest.raises(ValueError, match="manual optimisation"):
        module.automatic_optimization = True


# one forward per step: a plain LightningModule (automatic optimisation, no mixin) drives them
ONE_FORWARD = {
    "delayed": METHODS["delayed"],
    "pege": ("ste", lambda p: metaste.PEGE(torch.optim.SGD(p, lr=0.1, momentum=0.9), total_steps=STEPS)),
    "jacquant": ("ste", lambda p: metaste.JacQuant(torch.optim.Adam(p, lr=1e-2), every=2, group=2)),
}


class Automatic(L.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.net = mlp(surrogate=ONE_FORWARD[method][0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return ONE_FORWARD[self.method][1](self.parameters())


@pytest.mark.parametrize("method", list(ONE_FORWARD))
def test_automatic_optimisation_with_clipping_and_accumulation_equals_the_torch_loop(method):
    """gradient_clip_val and accumulate_grad_batches, which manual optimisation refuses, work with
    no adapter: Lightning's loop is the torch one, micro-batch backward, clip, ``opt.step()``."""
    data, accumulate, clip = batches(2 * STEPS), 2, 0.5
    model = mlp(surrogate=ONE_FORWARD[method][0])
    opt = ONE_FORWARD[method][1](model.parameters())
    for k in range(0, len(data), accumulate):
        for x, y in data[k : k + accumulate]:
            (F.cross_entropy(model(x), y) / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    module = Automatic(method)
    loader = torch.utils.data.DataLoader(list(data), batch_size=None, shuffle=False)
    trainer = quiet_trainer(gradient_clip_val=clip, accumulate_grad_batches=accumulate)
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS and trainer.optimizers[0].steps == STEPS
    got, want = tensors_of(module.net), tensors_of(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
