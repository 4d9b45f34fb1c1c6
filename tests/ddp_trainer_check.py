"""One S-CLIP optimisation step through the Trainer; saves the weights (rank 0).

Usage: python tests/ddp_trainer_check.py OUT.pt DEVICES [objective]
DEVICES=1 runs single-device on the whole global batch; DEVICES=2 runs DDP (gloo, CPU) with
half of it per process. tests/losses/test_ddp.py compares the two.
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sclip_lightning import SCLIPModule

BP, BU, K = 8, 8, 4
VOCAB = ["lake", "forest", "river", "beach"]


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class FixedBatch(L.LightningDataModule):
    """The same global batch every run; each process gets its share through Lightning."""

    def __init__(self, devices: int, tokenizer):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        texts = tokenizer([f"a {VOCAB[i % K]} seen from above, item {i}" for i in range(BP)])
        self.paired = [
            {
                "image": torch.randn(3, 32, 32, generator=g),
                "text": texts[i],
                "keywords": torch.tensor([j == i % K for j in range(K)]),
            }
            for i in range(BP)
        ]
        self.unpaired = [{"image": torch.randn(3, 32, 32, generator=g)} for _ in range(BU)]
        self.devices = devices

    def train_dataloader(self):
        return {
            "paired": DataLoader(Items(self.paired), batch_size=BP // self.devices, drop_last=True),
            "unpaired": DataLoader(
                Items(self.unpaired), batch_size=BU // self.devices, drop_last=True
            ),
        }


def main() -> None:
    out, devices = sys.argv[1], int(sys.argv[2])
    objective = sys.argv[3] if len(sys.argv) > 3 else "recommended"
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    model = SCLIPModule(
        model_name="sclip-tiny",
        objective=objective,
        keyword_vocabulary=VOCAB,
        lr=1e-3,
        warmup_steps=0,
        scheduler="constant",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(model, FixedBatch(devices, model.tokenizer))
    if trainer.is_global_zero:
        after = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"before": before, "after": after}, out)


if __name__ == "__main__":
    main()
