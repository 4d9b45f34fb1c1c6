"""Small helpers shared by the tests (the tests folder is on sys.path, see conftest.py)."""

from __future__ import annotations

from typing import Any

import lightning as L

from sclip_lightning import SCLIPModule
from sclip_lightning.losses import Assigner


def quiet_cpu_trainer(**overrides: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation."""
    import tempfile

    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        default_root_dir=tempfile.mkdtemp(prefix="sclip-test-"),  # results files land here
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


class StallAfterStep(L.Callback):
    """Test helper: after optimiser step ``step`` write ``marker`` and hang (to be killed)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import pathlib
            import time

            pathlib.Path(self.marker).write_text(str(self.step))
            time.sleep(600)


class DumpBatches(L.Callback):
    """Debug helper: append each step's paired/unpaired indices and RNG digest to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        import torch

        with open(self.path, "a") as f:
            f.write(
                f"{trainer.global_step} {batch['paired']['index'].tolist()} "
                f"{batch['unpaired']['index'].tolist()[:4]} {float(batch['paired']['image'].sum()):.6f} "
                f"{int(torch.get_rng_state().sum())}\n"
            )


class FixedPlan(Assigner):
    """Test assigner: the same plan whatever the features (selectable by import path)."""

    def __init__(self, plan: list[list[float]]) -> None:
        super().__init__()
        self.fixed = plan

    def plan(self, query, support, logit_scale, support_mask):
        import torch

        return torch.tensor(self.fixed, dtype=query.dtype, device=query.device)


class SGDModule(SCLIPModule):
    """SCLIPModule with plain SGD: for equality tests of two computations of the same step.

    AdamW's first steps are lr * g / (|g| + eps): float rounding noise in near-zero
    gradients (1e-9, e.g. from a convolution that picks another kernel for another batch
    size) becomes a weight difference of up to lr. SGD keeps it at rounding size."""

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(
            [p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr
        )
