"""Remote-sensing sources in their native layouts: RSICD, UCM-captions, Sydney-captions
(Karpathy-style JSON + image folder) and RSICD-CLS (class lists). The zero-shot class-folder
sets (UC Merced, WHU-RS19, RSSCN7, AID, RESISC45) are :class:`~sclip_lightning.data.generic.ClassFolder`
trees, registered by name in :mod:`sclip_lightning.data.registry`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sclip_lightning.data.base import CaptionedDataset, ImageRecords, Transform, require
from sclip_lightning.data.names import clean_class_name


class RSICD(CaptionedDataset):
    """RSICD (Lu et al. 2017): ``dataset_rsicd.json`` (Karpathy style) + ``RSICD_images/``.

    Args:
        root: folder holding ``dataset_rsicd.json`` and ``RSICD_images/``.
        split: ``"train" | "val" | "test"`` or None for all images.
        class_labels: read ``txtclasses_rsicd/`` (RSICD-CLS) into ``.labels`` / ``.classes``
            (-1 for images no class list names): hidden labels for diagnostics such as the
            pseudo-label accuracy (``hidden_labels``); never used by the losses.
    """

    LAYOUT = "<root>/dataset_rsicd.json\n<root>/RSICD_images/<filename>.jpg"
    INDEX = "dataset_rsicd.json"
    IMAGES = "RSICD_images"

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        class_labels: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), f"{type(self).__name__} root", self.LAYOUT)
        index = require(self.root / self.INDEX, "caption index", self.LAYOUT)
        images = require(self.root / self.IMAGES, "image folder", self.LAYOUT)
        data = json.loads(index.read_text(encoding="utf-8"))
        for rec in data["images"]:
            if split is not None and rec.get("split") != split:
                continue
            caps = [s["raw"] for s in rec.get("sentences", [])]
            self._add(images / rec["filename"], caps, f"{index} image {rec['filename']!r}")
        if not self.paths:
            raise ValueError(f"{index} has no images for split {split!r}")
        if class_labels:
            classes = RSICDClasses(self.root)
            label_of = {p.name: y for p, y in zip(classes.paths, classes.labels, strict=True)}
            self.classes = classes.classes
            self.labels = [label_of.get(p.name, -1) for p in self.paths]


class UCMCaptions(RSICD):
    """UCM-captions (Qu et al. 2016): ``dataset.json`` (Karpathy style) + ``images/``."""

    LAYOUT = "<root>/dataset.json\n<root>/images/<filename>"
    INDEX = "dataset.json"
    IMAGES = "images"


class SydneyCaptions(UCMCaptions):
    """Sydney-captions (Qu et al. 2016): ``dataset.json`` (Karpathy style) + ``images/``."""


class RSICDClasses(ImageRecords):
    """RSICD-CLS: ``txtclasses_rsicd/<Class>.txt`` list the file names of each class.

    Args:
        root: the RSICD root (``RSICD_images/`` and ``txtclasses_rsicd/``).
        split: keep only images of this split of ``dataset_rsicd.json`` (None: all listed).
    """

    LAYOUT = RSICD.LAYOUT + "\n<root>/txtclasses_rsicd/<Class>.txt (one file name a line)"

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "RSICD root", self.LAYOUT)
        lists = require(self.root / "txtclasses_rsicd", "class lists", self.LAYOUT)
        images = require(self.root / RSICD.IMAGES, "image folder", self.LAYOUT)
        keep: set[str] | None = None
        if split is not None:
            data = json.loads((self.root / RSICD.INDEX).read_text(encoding="utf-8"))
            keep = {r["filename"] for r in data["images"] if r.get("split") == split}
        files = sorted(lists.glob("*.txt"))
        if not files:
            raise ValueError(f"no <Class>.txt files in {lists}")
        self.classes = [clean_class_name(f.stem) for f in files]
        self.labels: list[int] = []
        for label, f in enumerate(files):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                name = line.strip()
                if name and (keep is None or name in keep):
                    self.paths.append(images / name)
                    self.labels.append(label)
        if not self.paths:
            raise ValueError(f"RSICD class lists in {lists} name no image (split {split!r})")

    def _record(self, index: int) -> dict[str, Any]:
        return {"label": self.labels[index]}
