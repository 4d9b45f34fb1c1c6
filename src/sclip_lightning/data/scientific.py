"""Scientific figures: SciCap in its native layout."""

from __future__ import annotations

import json
from pathlib import Path

from sclip_lightning.data.base import CaptionedDataset, Transform, require


class SciCap(CaptionedDataset):
    """SciCap (Hsu et al. 2021): ``SciCap-No-Subfig-Img/<split>/*.png`` +
    ``SciCap-Caption-All/<split>/*.json``; figures with sub-figures are skipped; caption =
    ``0-originally-extracted`` (the tokenizer truncates long captions; the release cut them
    to 77 characters, ``max_chars=77`` restores that)."""

    LAYOUT = (
        "<root>/SciCap-No-Subfig-Img/<split>/<id>.png\n<root>/SciCap-Caption-All/<split>/<id>.json"
    )

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        max_chars: int | None = None,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "SciCap root", self.LAYOUT)
        caps = require(self.root / "SciCap-Caption-All" / split, "caption folder", self.LAYOUT)
        imgs = require(self.root / "SciCap-No-Subfig-Img" / split, "image folder", self.LAYOUT)
        for f in sorted(caps.glob("*.json")):
            rec = json.loads(f.read_text(encoding="utf-8"))
            if rec.get("contains-subfigure"):
                continue
            cap = str(rec.get("0-originally-extracted", ""))
            if max_chars is not None:
                cap = cap[:max_chars]
            self._add(imgs / f"{f.stem}.png", [cap], str(f))
        if not self.paths:
            raise ValueError(f"SciCap {split}: no figure without sub-figures in {caps}")
