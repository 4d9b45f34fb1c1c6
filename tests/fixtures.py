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
            images.append(
                {
                    "filename": name,
                    "imgid": k,
                    "split": split,
                    "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
                }
            )
            lists[cls].append(name)
            k += 1
    (root / "dataset_rsicd.json").write_text(json.dumps({"images": images, "dataset": "rsicd"}))
    (root / "txtclasses_rsicd").mkdir(parents=True, exist_ok=True)
    for cls, names in lists.items():
        (root / "txtclasses_rsicd" / f"{cls}.txt").write_text("\n".join(names) + "\n")
    return root


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


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
    write_rsicd(out / "rsicd")
    write_caption_table(out / "table")
    write_class_folder(out / "classes")
    print(f"fixtures written under {out}")
