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
# # Your own domain: a folder of images and a CSV of captions
#
# The steps for your data: (1) a CSV with an `image` column (paths relative to the CSV) and
# a `caption` column, optionally `split`; (2) mine a keyword vocabulary from the captions;
# (3) train S-CLIP with a few captioned images and many uncaptioned ones; (4) evaluate;
# (5) export a folder in open_clip's hub layout that plain `open_clip` loads (and a model
# hub takes as it is).
#
# To keep this runnable offline, step 0 writes such a folder from the embedded synthetic
# domain. Replace `ROOT` with your own folder.

# %%
import csv
import os
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import open_clip
import torch
from PIL import Image

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.data.keywords import KeywordMatcher, mine_keywords
from sclip_lightning.data.synthetic import ensure_synthetic
from sclip_lightning.export import export
from sclip_lightning.results import markdown_table

STEPS = int(os.environ.get("SCLIP_NB_STEPS", 300))
OUT = Path(os.environ.get("SCLIP_NB_OUT", "outputs/notebooks/03_custom_domain"))
ROOT = OUT / "my_domain"

# %% [markdown]
# ## 0. A folder of images and a captions CSV

# %%
from sclip_lightning.data.registry import build_captioned  # noqa: E402

if not (ROOT / "captions.csv").exists():
    (ROOT / "images").mkdir(parents=True, exist_ok=True)
    source = ensure_synthetic()
    with (ROOT / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        for split in ("train", "val", "test"):
            ds = build_captioned("synthetic", source, split)
            for i, (path, caps) in enumerate(zip(ds.paths, ds.captions, strict=True)):
                if split == "train" and i % 3:  # keep a third: a smaller custom domain
                    continue
                name = f"images/{split}_{i:05d}{path.suffix}"
                (ROOT / name).write_bytes(path.read_bytes())
                for c in caps:
                    w.writerow([name, c, split])
print((ROOT / "captions.csv").read_text()[:300])

# %% [markdown]
# ## 1. Keywords mined from the captions
# With `spacy.blank("en")` (no model download): frequent content words and bigrams. With a
# full English pipeline installed, noun chunks are used.

# %%
with (ROOT / "captions.csv").open() as f:
    rows = list(csv.DictReader(f))
keywords = mine_keywords([r["caption"] for r in rows if r["split"] == "train"], top_k=30)
print(len(keywords), "keywords:", ", ".join(keywords[:20]), "...")
# count with the matcher training uses (whole words and phrases, case-insensitive)
matcher = KeywordMatcher(keywords)
counts = torch.stack([matcher(r["caption"]) for r in rows if r["split"] == "train"]).sum(0)
order = counts.argsort(descending=True).tolist()
fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(range(len(keywords)), counts[order].tolist())
ax.set_xticks(range(len(keywords)), [keywords[i] for i in order], rotation=70, fontsize=8)
ax.set(ylabel="training captions", title="mined keywords and how many captions contain them")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Train: 10 % of the training images keep their captions

# %%
L.seed_everything(0, verbose=False)
data = SCLIPDataModule(
    dataset="caption_table",
    root=str(ROOT / "captions.csv"),
    label_ratio=0.1,
    keywords="mine",
    num_keywords=30,
    batch_size=16,
    unpaired_batch_size=16,
    num_workers=0,
    model_name="sclip-tiny-rn",
    combined_mode="max_size_cycle",
)
module = SCLIPModule(
    model_name="sclip-tiny-rn",
    lr=1e-3,
    warmup_steps=min(50, STEPS // 5),
    results_dir=str(OUT / "results"),
)
trainer = L.Trainer(
    accelerator="cpu",
    max_steps=STEPS,
    limit_val_batches=0,
    default_root_dir=str(OUT),
    enable_model_summary=False,
)
trainer.fit(module, data)

# %% [markdown]
# ## 3. Evaluate: retrieval on the test split (a captions-only domain has no classes)

# %%
trainer.test(module, data, verbose=False)
print(markdown_table(module.test_results))
print("written:", sorted(p.name for p in (OUT / "results").iterdir()))
res = next(r for r in module.test_results if r["task"] == "retrieval")
names = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
fig, ax = plt.subplots(figsize=(6.5, 3))
ax.bar(names, [res[n] for n in names], color=["C0"] * 3 + ["C1"] * 3)
ax.set(ylabel="recall (%)", title=f"test retrieval after {STEPS} steps (i2t blue, t2i orange)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Export and load with plain open_clip
# `export` (the `sclip-export` command) writes `open_clip_config.json` (the model config and
# the preprocessing training used), `open_clip_model.safetensors` and a `README.md` model
# card with the test table above (found in the module's `results_dir`).

# %%
ckpt = OUT / "final.ckpt"
trainer.save_checkpoint(ckpt)
folder = export(ckpt, OUT / "sclip-my-domain")
print(sorted(p.name for p in folder.iterdir()))
card = (folder / "README.md").read_text()
print(card[card.index("## Test results") :])

# %% [markdown]
# Plain open_clip rebuilds the model, its preprocessing and its tokenizer from the folder:
# the same image file and the same caption give the features of the trained module.

# %%
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
model.eval()
module.eval()
test_rows = [r for r in rows if r["split"] == "test"]
image = Image.open(ROOT / test_rows[0]["image"])
caption = test_rows[0]["caption"]
with torch.no_grad():
    a = model.encode_image(preprocess(image)[None], normalize=True)
    b = module.encode_images(data.eval_transform(image)[None])
    c = model.encode_text(tokenizer([caption]), normalize=True)
    d = module.encode_texts(module.tokenizer([caption]))
diff = max(float((a - b).abs().max()), float((c - d).abs().max()))
print("max feature difference, open_clip from the folder vs the trained module:", diff)
assert diff < 1e-5, "the exported folder does not reproduce the trained model"
