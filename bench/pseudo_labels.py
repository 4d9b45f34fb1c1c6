"""Pseudo-label accuracy of every assigner vs the size of the paired support.

For random batches of B_u = 32 unpaired queries and a paired support of 32, 128 or all
pairs (the support bank with one slot per pair), it measures how often the support image
picked by each assigner (argmax of its plan) has the query's class (hidden labels, never
used by the assigners), and how often that class is present in the support at all.

Data:
- ``--data rsicd-mini`` (default): frozen ImageNet EfficientNet-lite0 features of
  ../shared/data/rsicd-mini (the offline image tower, computed through the product's
  tower-output cache with configs/real/rsicd_mini_lit.yaml), RSICD's 30 classes;
- ``--data synthetic``: the image features of the CLIP baseline trained 600 steps on the
  embedded synthetic domain (10 classes).
Usage: python bench/pseudo_labels.py [--data rsicd-mini] [--batches 200] [--scales 14.3 100]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sclip_lightning.losses import (
    CLIPLoss,
    HardNNAssigner,
    OTAssigner,
    SoftNNAssigner,
    UnbalancedOTAssigner,
)

REPO = Path(__file__).resolve().parents[1]
ASSIGNERS = {
    "OT (S-CLIP)": OTAssigner(),
    "unbalanced OT, reg_m 0.2": UnbalancedOTAssigner(reg_m=0.2),
    "unbalanced OT, reg_m 0.05": UnbalancedOTAssigner(reg_m=0.05),
    "unbalanced OT, reg_m 0.01": UnbalancedOTAssigner(reg_m=0.01),
    "Soft-PL": SoftNNAssigner(),
    "Hard-PL": HardNNAssigner(),
}


def rsicd_features():
    """(paired features, labels), (unpaired features, labels) of the rsicd-mini train split."""
    from sclip_lightning.cli import build_cli
    from sclip_lightning.data import RSICDClasses

    cli = build_cli(["--config", str(REPO / "configs" / "real" / "rsicd_mini_lit.yaml")], run=False)
    dm, module = cli.datamodule, cli.model
    dm.setup("fit")
    module.configure_tower_cache(dm)  # what setup does when tower_cache is on
    feats = dm.tower_outputs.outputs(f"{dm.hparams.dataset}/train", dm.train_base, False).images
    classes = RSICDClasses(dm.root, split="train")
    label_of = {p.name: y for p, y in zip(classes.paths, classes.labels, strict=True)}
    labels = torch.tensor([label_of.get(p.name, -1) for p in dm.train_base.paths])
    feats = F.normalize(feats.flatten(1), dim=-1)
    p, u = torch.tensor(dm.paired_indices), torch.tensor(dm.unpaired_indices)
    u = u[labels[u] >= 0]  # queries with a known class
    return (feats[p], labels[p]), (feats[u], labels[u])


def synthetic_features(steps: int):
    import lightning as L

    from sclip_lightning import SCLIPDataModule, SCLIPModule

    L.seed_everything(0, verbose=False)
    dm = SCLIPDataModule(num_workers=1, model_name="sclip-tiny-rn", hidden_labels=True)
    module = SCLIPModule(model_name="sclip-tiny-rn", criterion=CLIPLoss(), lr=1e-3, warmup_steps=50)
    L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, dm)
    module.eval()

    @torch.no_grad()
    def encode(indices):
        images = torch.stack([dm.eval_transform(dm.train_base[i]["image"]) for i in indices])
        return module.encode_images(images), torch.tensor(
            [dm.train_base.labels[i] for i in indices]
        )

    return encode(dm.paired_indices), encode(dm.unpaired_indices)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", choices=["rsicd-mini", "synthetic"], default="rsicd-mini")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 0], help="0: all pairs")
    p.add_argument("--scales", type=float, nargs="+", default=[14.3, 100.0])
    p.add_argument("--steps", type=int, default=600, help="synthetic: CLIP training steps")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    (xp, yp), (xu, yu) = (
        rsicd_features() if args.data == "rsicd-mini" else synthetic_features(args.steps)
    )
    print(
        f"{args.data}: {len(yp)} pairs, {len(yu)} unpaired queries, {args.batches} random "
        f"batches of {args.queries} queries per support size; accuracy in %"
    )
    for s in args.scales:
        scale = torch.tensor(s)
        head = "| support | class in support | " + " | ".join(ASSIGNERS) + " |"
        print(f"\ns = {s:g} (OT reg = 1/s)\n\n{head}\n|" + "---|" * (len(ASSIGNERS) + 2))
        for size in args.sizes:
            n = len(yp) if size == 0 or size > len(yp) else size
            g = torch.Generator().manual_seed(0)
            acc = dict.fromkeys(ASSIGNERS, 0.0)
            present = 0.0
            for _ in range(args.batches):
                ip = torch.randperm(len(yp), generator=g)[:n]
                iu = torch.randperm(len(yu), generator=g)[: args.queries]
                lp, lu = yp[ip], yu[iu]
                present += (lu[:, None] == lp[None, :]).any(1).float().mean().item()
                for name, assigner in ASSIGNERS.items():
                    plan = assigner(xu[iu], xp[ip], xp[ip], scale)
                    acc[name] += (lp[plan.argmax(1)] == lu).float().mean().item()
            label = "all pairs (bank)" if n == len(yp) else str(n)
            cells = " | ".join(f"{100 * acc[a] / args.batches:.1f}" for a in ASSIGNERS)
            print(f"| {label} | {100 * present / args.batches:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
