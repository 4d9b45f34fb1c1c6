# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What S-CLIP's pseudo-labels look like
#
# S-CLIP gives each unpaired image a *caption-level* pseudo-label, a mixture of the batch's
# paired captions chosen by optimal transport (OT) between unpaired and paired images, and a
# *keyword-level* partial label, the keywords of the caption of its nearest paired image.
# This notebook trains briefly on the synthetic aerial domain, takes one batch and shows
# both, then compares OT with the Soft-PL and Hard-PL assigners of the paper's ablation
# against the hidden true classes of the unpaired images (the synthetic domain knows them;
# the losses never see them).

# %%
import os

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.losses import (
    HardNNAssigner,
    OTAssigner,
    SoftNNAssigner,
    UnbalancedOTAssigner,
    assign,
    keyword_targets,
)
from sclip_lightning.results import markdown_table

STEPS = int(os.environ.get("SCLIP_NB_STEPS", 300))
L.seed_everything(0, verbose=False)

# %% [markdown]
# `hidden_labels=True` adds each training image's class to the batches: the module logs the
# share of unpaired images whose OT assignment points to a paired image of their own class
# (`train/pseudo_label_acc`) during training.

# %%
data = SCLIPDataModule(
    dataset="synthetic",
    label_ratio=0.1,
    batch_size=16,
    unpaired_batch_size=16,
    num_workers=0,
    model_name="sclip-tiny-rn",
    hidden_labels=True,
    combined_mode="max_size_cycle",
)
module = SCLIPModule(model_name="sclip-tiny-rn", lr=1e-3, warmup_steps=min(50, STEPS // 5))
trainer = L.Trainer(
    accelerator="cpu",
    max_steps=STEPS,
    limit_val_batches=0,
    logger=False,
    enable_checkpointing=False,
    enable_model_summary=False,
)
trainer.fit(module, data)
print(
    "pseudo-label accuracy during the last epoch:",
    float(trainer.callback_metrics.get("train/pseudo_label_acc_epoch", float("nan"))),
)

# %% [markdown]
# ## One batch through the assigners

# %%
module.eval()
batch = next(iter(data.train_dataloader()))[0]
paired, unpaired = batch["paired"], batch["unpaired"]
classes = data.train_base.classes
with torch.no_grad():
    img = module.encode_images(paired["image"])
    txt = module.encode_texts(paired["text"])
    unp = module.encode_images(unpaired["image"])
    kw = module.encode_keywords()
    s = module.logit_scale()
    assigners = {
        "ot": OTAssigner(),
        "unbalanced_ot": UnbalancedOTAssigner(),
        "soft_nn": SoftNNAssigner(),
        "hard_nn": HardNNAssigner(),
    }
    plans = {name: assign(unp, img, txt, s, assigner=a) for name, a in assigners.items()}
captions = [data.train_base.captions[i][0] for i in paired["index"].tolist()]

# %% [markdown]
# ## The OT plan
# Rows: unpaired images, columns: paired images (and their captions), sorted by class.
# Each row sums to one: it is the caption mixture the unpaired image is trained towards.
# A good plan is block-diagonal: mass on paired images of the same (hidden) class.

# %%
p_order = torch.argsort(paired["label"], stable=True)
u_order = torch.argsort(unpaired["label"], stable=True)
plan = plans["ot"][u_order][:, p_order].numpy()
fig, ax = plt.subplots(figsize=(6.5, 5.5))
im = ax.imshow(plan, cmap="viridis")
ax.set_xticks(
    range(len(p_order)), [classes[c] for c in paired["label"][p_order]], rotation=90, fontsize=7
)
ax.set_yticks(range(len(u_order)), [classes[c] for c in unpaired["label"][u_order]], fontsize=7)
ax.set(
    xlabel="paired image (true class)",
    ylabel="unpaired image (hidden class)",
    title="OT assignment of unpaired to paired captions",
)
fig.colorbar(im, ax=ax, label="plan weight (rows sum to 1)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Unpaired images beside the captions they are assigned
# For four unpaired images: the image, then its three heaviest captions with their weights.


# %%
def show(t):
    x = t.permute(1, 2, 0).numpy()
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


fig, axes = plt.subplots(4, 4, figsize=(11, 8.5))
for row, j in enumerate(range(4)):
    axes[row, 0].imshow(show(unpaired["image"][j]))
    axes[row, 0].set_title(f"unpaired #{j} (hidden: {classes[unpaired['label'][j]]})", fontsize=8)
    top = torch.topk(plans["ot"][j], 3)
    for col, (w, i) in enumerate(
        zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1
    ):
        axes[row, col].imshow(show(paired["image"][i]))
        axes[row, col].set_title(f"w={w:.2f}: {captions[i][:38]}", fontsize=7)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Keyword candidates and their weights
# The candidate set of an unpaired image is the keyword set of the caption of its heaviest
# paired image; inside it the weights come from the model's own similarity (softmax, the
# recommended option; the release normalises linearly).

# %%
nearest = plans["ot"].argmax(dim=-1)
cands = paired["keywords"][nearest].bool()
targets = keyword_targets(unp, kw, cands, s, module.criterion.keyword_weighting)
rows = []
for j in range(6):
    ks = cands[j].nonzero().squeeze(1).tolist()
    rows.append(
        {
            "unpaired": j,
            "hidden class": classes[unpaired["label"][j]],
            "candidates (weight)": ", ".join(
                f"{module.keywords[k]} ({targets[j, k]:.2f})" for k in ks
            )
            or "none",
        }
    )
print(markdown_table(rows))

# %% [markdown]
# ## OT vs Soft-PL vs Hard-PL
# Accuracy of each assigner on this batch: the share of unpaired images whose heaviest
# paired image has their hidden class, and the share of plan mass on paired images of the
# right class.

# %%
same = (unpaired["label"][:, None] == paired["label"][None, :]).float()
rows = []
for name, pl in plans.items():
    rows.append(
        {
            "assigner": name,
            "argmax accuracy %": 100 * float(same.gather(1, pl.argmax(1, keepdim=True)).mean()),
            "mass on true class %": 100 * float((pl * same).sum(1).mean()),
        }
    )
print(markdown_table(rows))
fig, ax = plt.subplots(figsize=(5.5, 3))
x = np.arange(len(rows))
ax.bar(x - 0.2, [r["argmax accuracy %"] for r in rows], 0.4, label="argmax accuracy")
ax.bar(x + 0.2, [r["mass on true class %"] for r in rows], 0.4, label="mass on true class")
ax.set_xticks(x, [r["assigner"] for r in rows])
ax.set(ylabel="percent", ylim=(0, 100), title="pseudo-labels vs hidden classes (one batch)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
