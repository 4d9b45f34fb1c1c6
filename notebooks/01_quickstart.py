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
# # Quickstart: S-CLIP with the Python API
#
# Train a tiny open_clip model on the embedded synthetic aerial domain (10 classes, 10 % of
# the training images captioned, the rest unpaired), with S-CLIP and with the supervised
# CLIP baseline on the same pairs; evaluate zero-shot classification and retrieval; plot
# the learning curves. Runs offline on a CPU in a few minutes (`STEPS` below).

# %%
import os

import lightning as L
import matplotlib.pyplot as plt
import pandas as pd
from lightning.pytorch.loggers import CSVLogger

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.losses import CLIPLoss, SCLIPLoss
from sclip_lightning.results import markdown_table

STEPS = int(os.environ.get("SCLIP_NB_STEPS", 300))  # the test suite sets a handful
OUT = os.environ.get("SCLIP_NB_OUT", "outputs/notebooks/01_quickstart")

# %% [markdown]
# ## Data and model
# `SCLIPDataModule` splits the captioned training set into pairs (`label_ratio`) and
# unpaired images, and combines a paired and an unpaired loader. `SCLIPModule` wraps an
# open_clip model and takes its objective as a component: `SCLIPLoss()` (the default) or
# `CLIPLoss()`, the baseline on the pairs only.


# %%
def make(method: str, seed: int = 0):
    L.seed_everything(seed, workers=True, verbose=False)
    data = SCLIPDataModule(
        dataset="synthetic",
        label_ratio=0.1,
        batch_size=32,
        unpaired_batch_size=32,
        num_workers=0,
        model_name="sclip-tiny-rn",
        combined_mode="max_size_cycle",
    )
    module = SCLIPModule(
        model_name="sclip-tiny-rn",
        criterion=SCLIPLoss() if method == "sclip" else CLIPLoss(),
        lr=1e-3,
        warmup_steps=min(50, STEPS // 5),
        results_dir=f"{OUT}/{method}",
    )
    return data, module


def train_and_test(method: str):
    data, module = make(method)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        limit_val_batches=0,
        log_every_n_steps=5,
        logger=CSVLogger(OUT, name=method),
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    curves = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")
    return module.test_results, curves


results, curves = {}, {}
for method in ("clip", "sclip"):
    results[method], curves[method] = train_and_test(method)

# %% [markdown]
# ## Learning curves

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for method, df in curves.items():
    steps = df.dropna(subset=["train/loss"])
    axes[0].plot(steps["step"], steps["train/contrastive_loss"], label=f"{method}: contrastive")
    if method == "sclip":
        axes[0].plot(steps["step"], steps["train/caption_loss"], label="sclip: caption (OT)")
        axes[0].plot(steps["step"], steps["train/keyword_loss"], label="sclip: keyword (PLL)")
    axes[1].plot(steps["step"], steps["train/logit_scale"], label=method)
axes[0].set(title="training losses (weighted)", xlabel="optimiser step", ylabel="loss")
axes[1].set(title="logit scale s", xlabel="optimiser step", ylabel="s")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Results
# One row per method: zero-shot top-1/top-5 on the test split and retrieval recall in both
# directions (R@k in percent). With a few hundred steps from random weights single runs
# move by several points; `make demo` runs several seeds.

# %%
rows = []
for method, res in results.items():
    zs = next(r for r in res if r["task"] == "zero-shot")
    rt = next(r for r in res if r["task"] == "retrieval")
    rows.append(
        {
            "method": method,
            "zero-shot top-1": zs["top1"],
            "top-5": zs["top5"],
            "i2t R@1": rt["i2t_R@1"],
            "t2i R@1": rt["t2i_R@1"],
            "mean R": rt["mean_R"],
        }
    )
print(markdown_table(rows))

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
names = ["zero-shot top-1", "mean R"]
for i, row in enumerate(rows):
    ax.bar(
        [j + 0.38 * i for j in range(len(names))],
        [row[n] for n in names],
        width=0.38,
        label=row["method"],
    )
ax.set_xticks([j + 0.19 for j in range(len(names))], names)
ax.set(ylabel="percent", title=f"test split, {STEPS} steps")
ax.legend()
fig.tight_layout()
plt.show()
