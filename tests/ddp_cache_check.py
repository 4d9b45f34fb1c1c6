"""A 2-process (gloo, CPU) float64 S-CLIP fit (SGD: see helpers.SGDModule) of the tiny timm + HF
model, with or without the tower-output cache; rank 0 saves the final weights.
tests/test_tower_cache.py compares them (to 1e-10: float64, see F64 there).

Usage: python tests/ddp_cache_check.py OUT.pt {none,both} MODEL_CONFIG_DIR SYNTHETIC_ROOT
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
from helpers import SGDModule

from sclip_lightning import SCLIPDataModule


def main(out: str, cache: str, config_dir: str, root: str) -> None:
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    dm = SCLIPDataModule(
        root=root,
        model_name="sclip-tiny-lit",
        batch_size=4,
        unpaired_batch_size=4,
        num_workers=0,
        augment=False,
        label_ratio=0.1,
        order_seed=0,
    )
    m = SGDModule(
        model_name="sclip-tiny-lit",
        model_config_dir=config_dir,
        lock_image=True,
        lock_text=True,
        tower_cache=None if cache == "none" else cache,
        lr=0.5,
        warmup_steps=1,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, dm)
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in m.model.state_dict().items()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
