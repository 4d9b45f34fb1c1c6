"""One S-CLIP optimisation step through the Trainer; saves weights and gradients (rank 0).

The step uses plain SGD: AdamW's first step is lr * g / (|g| + eps), which turns float
rounding noise in near-zero gradients (|g| ~ 1e-7, e.g. attention key biases, whose exact
gradient is 0) into differences of up to 2 * lr, so it cannot show equality at 1e-5. The
gradients after DDP's all-reduce are compared directly as well.

The towers run in float64 (``precision="64-true"``): on half batches DDP computes them with
other kernels and summation orders, which in float32 differ by rounding on any CPU. In float64
both runs hand SCLIPLoss (which computes in float32) the same float32 features, in another row
order (DDP's sampler orders the global batch differently); tests/losses/test_ddp.py bounds what
that reordering can change.

Usage: python tests/ddp_trainer_check.py OUT.pt DEVICES [objective]
DEVICES=1 runs single-device on the whole global batch; DEVICES=2 runs DDP (gloo, CPU) with
half of it per process. tests/losses/test_ddp.py compares the two.
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
from helpers import quiet_cpu_trainer
from torch.utils.data import DataLoader, Dataset

from sclip_lightning import SCLIPModule
from sclip_lightning.losses import SCLIPLoss

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


class SGDModule(SCLIPModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    out, devices = sys.argv[1], int(sys.argv[2])
    objective = sys.argv[3] if len(sys.argv) > 3 else "recommended"
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    model = SGDModule(
        model_name="sclip-tiny",
        criterion=SCLIPLoss.released() if objective == "released" else SCLIPLoss(),
        keyword_vocabulary=VOCAB,
        lr=0.1,
        warmup_steps=0,
        scheduler="constant",
    )
    model = model.double()  # before the snapshot: "64-true" would convert it in fit
    trainer = quiet_cpu_trainer(
        precision="64-true",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        num_sanity_val_steps=0,
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads: dict[str, torch.Tensor] = {}

    class GradRecorder(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for n, p in pl_module.named_parameters():
                if p.grad is not None:
                    grads[n] = p.grad.detach().clone()

    trainer.callbacks.append(GradRecorder())
    trainer.fit(model, FixedBatch(devices, model.tokenizer))
    if trainer.is_global_zero:
        after = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"before": before, "after": after, "grads": grads}, out)


if __name__ == "__main__":
    main()
