"""Numerical safety: non-finite steps are caught (raise or skip) without corrupting the
weights, and mixed precision trains clean on CPU."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.callbacks import NonFiniteGuard


class NaNAtStep(SCLIPModule):
    """Makes the caption loss NaN at one training step."""

    bad_step = 3

    def compute_losses(self, batch):
        losses = super().compute_losses(batch)
        if self.trainer.global_step == self.bad_step:
            losses["caption_loss"] = losses["caption_loss"] * float("nan")
        return losses


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = {
            n: p.detach().clone() for n, p in module.named_parameters()
        }


def _data():
    return SCLIPDataModule(
        dataset="synthetic", label_ratio=0.02, batch_size=8, unpaired_batch_size=8, num_workers=0
    )


def _module(cls=NaNAtStep, **kw):
    return cls(model_name="sclip-tiny", lr=1e-3, warmup_steps=0, **kw)


def _guard(trainer) -> NonFiniteGuard:
    """The guard the module installed (configure_callbacks)."""
    return next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))


@pytest.mark.parametrize("every", [1, 50])
def test_nonfinite_loss_raises_naming_the_step_and_terms(synthetic_root, every):
    module = _module(nonfinite="raise", nonfinite_check_every_n_steps=every)
    snaps = Snapshots()
    trainer = quiet_cpu_trainer(max_steps=6, callbacks=[snaps])
    with pytest.raises(FloatingPointError) as err:
        trainer.fit(module, datamodule=_data())
    msg = str(err.value)
    assert "training step 3" in msg and "caption_loss=nan" in msg and "nonfinite='skip'" in msg
    for p in module.parameters():  # the bad update was never applied, nor any after it
        assert torch.isfinite(p).all()
    if every == 1:  # stopped right after step 3: its update was cancelled on the device
        after = {n: p.detach() for n, p in module.named_parameters()}
        for n, p in snaps.before[3].items():
            assert torch.equal(p, after[n]), n


def test_nonfinite_skip_counts_and_leaves_the_weights_untouched(synthetic_root):
    module = _module(nonfinite="skip", nonfinite_check_every_n_steps=2)
    snaps = Snapshots()
    trainer = quiet_cpu_trainer(max_steps=6, callbacks=[snaps])
    trainer.fit(module, datamodule=_data())
    guard = _guard(trainer)
    assert int(guard.steps) == 1 and int(guard.first_step) == 3
    for n, p in snaps.before[3].items():  # step 3 changed nothing ...
        assert torch.equal(p, snaps.before[4][n]), n
    assert any(  # ... and training went on around it
        not torch.equal(snaps.before[4][n], snaps.before[5][n]) for n in snaps.before[4]
    )
    opt = trainer.optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {5}  # 6 batches, one skipped: AdamW's step count excludes it
    for p in module.parameters():
        assert torch.isfinite(p).all()


def test_nonfinite_gradient_with_a_finite_loss_is_caught(synthetic_root):
    class InfGrad(SCLIPModule):
        def compute_losses(self, batch):
            losses = super().compute_losses(batch)
            if self.trainer.global_step == 2:  # finite value, infinite gradient
                scale = self.model.logit_scale
                losses["contrastive_loss"] = losses["contrastive_loss"] + torch.sqrt(
                    (scale - scale.detach()).abs()
                )
            return losses

    module = _module(InfGrad, nonfinite="skip")
    trainer = quiet_cpu_trainer(max_steps=4)
    trainer.fit(module, datamodule=_data())
    guard = _guard(trainer)
    assert int(guard.steps) == 1 and int(guard.first_step) == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_clean_on_cpu(synthetic_root, precision):
    module = _module(SCLIPModule)
    trainer = quiet_cpu_trainer(max_steps=4, precision=precision, log_every_n_steps=1)
    trainer.fit(module, datamodule=_data())
    assert int(_guard(trainer).steps) == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_subclass_with_other_loss_terms_is_named_in_the_error(synthetic_root):
    class ExtraTerm(SCLIPModule):
        def compute_losses(self, batch):
            losses = super().compute_losses(batch)
            bad = float("inf") if self.trainer.global_step == 2 else 0.0
            losses["my_regulariser"] = losses["contrastive_loss"] * 0 + bad
            return losses

    module = _module(ExtraTerm, nonfinite="raise", nonfinite_check_every_n_steps=1)
    with pytest.raises(FloatingPointError, match=r"training step 2 .*my_regulariser=inf"):
        quiet_cpu_trainer(max_steps=5).fit(module, datamodule=_data())
