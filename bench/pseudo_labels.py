"""Pseudo-label accuracy of the assigners vs the size of the paired support.

Trains the supervised CLIP baseline on the synthetic domain (10% pairs, 600 steps, seed 0),
freezes it, encodes every training image, then for random batches of B_u unpaired queries
and B_p paired supports measures how often the support image picked by each assigner
(argmax of the OT plan, soft-NN, hard-NN) has the query's class (hidden labels), and how
often that class is present in the support at all. The OT plan has uniform marginals, so
with few supports per class it must send some queries to other classes.
Usage: python bench/pseudo_labels.py [--batches 50] [--steps 600]
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.losses import assign


@torch.no_grad()
def encode_all(module, dm, indices):
    feats, labels = [], []
    base = dm.train_base
    for start in range(0, len(indices), 256):
        chunk = indices[start : start + 256]
        images = torch.stack([dm.eval_transform(base[i]["image"]) for i in chunk])
        feats.append(module.encode_images(images))
        labels.extend(base.labels[i] for i in chunk)
    return torch.cat(feats), torch.tensor(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 300])
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    dm = SCLIPDataModule(num_workers=1, model_name="sclip-tiny-rn", hidden_labels=True)
    module = SCLIPModule(model_name="sclip-tiny-rn", method="clip", lr=1e-3, warmup_steps=50)
    L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, dm)
    module.eval()
    xp, yp = encode_all(module, dm, dm.paired_indices)
    xu, yu = encode_all(module, dm, dm.unpaired_indices)
    s = module.logit_scale().detach()
    g = torch.Generator().manual_seed(0)
    print(
        f"frozen CLIP baseline after {args.steps} steps, s = {float(s):.1f}; "
        f"{len(yp)} pairs, {len(yu)} unpaired, {args.batches} random batches per size"
    )
    print("| support B_p = queries B_u | class present in support | OT | soft-NN | hard-NN |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        size = min(size, len(yp))
        acc = {"ot": 0.0, "soft_nn": 0.0, "hard_nn": 0.0}
        present = 0.0
        for _ in range(args.batches):
            ip = torch.randperm(len(yp), generator=g)[:size]
            iu = torch.randperm(len(yu), generator=g)[:size]
            lp, lu = yp[ip], yu[iu]
            present += (lu[:, None] == lp[None, :]).any(1).float().mean().item()
            for name in acc:
                plan = assign(xu[iu], xp[ip], xp[ip], s, assigner=name, support="image")
                acc[name] += (lp[plan.argmax(1)] == lu).float().mean().item()
        n = args.batches
        print(
            f"| {size} | {100 * present / n:.1f} | {100 * acc['ot'] / n:.1f} | "
            f"{100 * acc['soft_nn'] / n:.1f} | {100 * acc['hard_nn'] / n:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
