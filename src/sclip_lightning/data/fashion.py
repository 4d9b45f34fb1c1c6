"""Fashion sources in their native layouts: Fashion200k (label files + images), FashionGen
(HDF5), Polyvore Outfits (info JSON + images), with their zero-shot class views.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from sclip_lightning.data.base import (
    CaptionedDataset,
    LabelledRecords,
    Transform,
    random_index,
    require,
    split_name,
)
from sclip_lightning.data.images import CorruptImageError, load_image, to_rgb

log = logging.getLogger(__name__)


class Fashion200k(CaptionedDataset):
    """Fashion200k (Han et al. 2017): ``{dress,jacket,pants,skirt,top}_{split}_detect_all.txt``.

    Each line is ``path TAB score TAB sentence``; images lie under ``root``. As in the
    release, records are products (the 4th path component is the item id) with the
    sentence as caption; a product's images are all kept (``.paths`` holds the first; the
    others are in ``.item_images`` and sampled at random per visit when
    ``random_item_image=True``). Lines whose image is missing are skipped and counted
    (``.missing``), as the release silently did; ``strict=True`` raises instead.

    Args:
        root: the Fashion200k folder. split: ``"train"`` or ``"test"``.
    """

    CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")
    LAYOUT = "<root>/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt\n<root>/women/..."

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        random_item_image: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "Fashion200k root", self.LAYOUT)
        split = split_name("fashion200k", split)
        items: dict[str, dict[str, Any]] = {}
        self.missing = 0
        for cat in self.CATEGORIES:
            path = require(self.root / f"{cat}_{split}_detect_all.txt", "label file", self.LAYOUT)
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise ValueError(f"{path} line {n}: expected 'path<TAB>score<TAB>sentence'")
                rel, _, sentence = parts
                comps = rel.split("/")
                if len(comps) < 5:
                    raise ValueError(f"{path} line {n}: image path {rel!r} has no item id")
                if not (self.root / rel).is_file():
                    if strict:
                        raise FileNotFoundError(f"{path} line {n}: image not found {rel}")
                    self.missing += 1
                    continue
                item = items.setdefault(
                    comps[3],
                    {"images": [], "caption": sentence, "category": cat, "subcategory": comps[2]},
                )
                item["images"].append(self.root / rel)
        if self.missing:
            log.warning(
                "Fashion200k %s: %d listed images are missing (skipped)", split, self.missing
            )
        self.item_ids = list(items)
        self.item_images = [items[i]["images"] for i in self.item_ids]
        self.random_item_image = random_item_image
        for i in self.item_ids:
            self._add(items[i]["images"][0], [items[i]["caption"]], f"Fashion200k item {i}")
        if not self.paths:
            raise ValueError(
                f"Fashion200k {split}: no item with an existing image under {self.root}"
            )

    @property
    def random_views(self) -> bool:  # type: ignore[override]
        return self.random_item_image

    def load(self, index: int) -> tuple[Image.Image, str]:
        images = self.item_images[index]
        path = images[random_index(len(images))] if self.random_item_image else images[0]
        return load_image(path), str(path)


class FashionGen(CaptionedDataset):
    """FashionGen (Rostamzadeh et al. 2018): ``fashiongen_256_256_{train,validation}.hdf5``.

    Records are products (``input_productID``); caption = ``name + ". " + description``
    (latin-1, as the release); a product's images are sampled at random per visit
    (``random_item_image``, as the release; False: its first image). Needs ``h5py``.
    """

    LAYOUT = "<root>/fashiongen_256_256_{train,validation}.hdf5"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        random_item_image: bool = True,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "FashionGen root", self.LAYOUT)
        self.random_item_image = random_item_image
        split = split_name("fashiongen", split)
        self.file = require(
            self.root / f"fashiongen_256_256_{split}.hdf5", "HDF5 file", self.LAYOUT
        )
        h5 = _open_h5(self.file)
        ids = h5["input_productID"][:].reshape(-1)
        names = h5["input_name"][:].reshape(-1)
        descs = h5["input_description"][:].reshape(-1)
        items: dict[int, list[int]] = {}
        for idx, pid in enumerate(ids.tolist()):
            items.setdefault(int(pid), []).append(idx)
        self.item_rows = list(items.values())
        for rows in self.item_rows:
            r = rows[0]
            cap = _decode(names[r]) + ". " + _decode(descs[r])
            self._add(Path(f"{self.file}#{r}"), [cap], f"{self.file} row {r}")
        self._h5: Any = None

    @property
    def random_views(self) -> bool:  # type: ignore[override]
        return self.random_item_image

    def load(self, index: int) -> tuple[Image.Image, str]:
        rows = self.item_rows[index]
        row = rows[random_index(len(rows))] if self.random_item_image else rows[0]
        return _h5_image(self, row), f"{self.file}#{row}"

    def __getstate__(self):
        return _state_without_h5(self)


def _h5_image(ds: Any, row: int) -> Image.Image:
    """Row ``row`` of ``input_image`` as RGB; the file is opened lazily, once per worker.

    Raises:
        CorruptImageError: the row holds no decodable image (names the file and the row).
    """
    if ds._h5 is None:
        ds._h5 = _open_h5(ds.file)
    try:
        array = ds._h5["input_image"][row]
        return to_rgb(Image.fromarray(array))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CorruptImageError(
            f"cannot decode image row {row} of {ds.file}: {e}. Repair the file, or pass "
            "skip_corrupt=True to skip unreadable images (they are counted and logged)."
        ) from e


def _state_without_h5(ds: Any) -> dict[str, Any]:
    """Pickle state without the open HDF5 handle (DataLoader workers reopen it)."""
    state = ds.__dict__.copy()
    state["_h5"] = None
    return state


def _open_h5(path: Path):
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise ImportError("FashionGen needs h5py: pip install h5py") from e
    return h5py.File(path, "r")


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _decode(value.tolist()[0] if isinstance(value.tolist(), list) else value.tolist())
    return str(value)


class Polyvore(CaptionedDataset):
    """Polyvore Outfits: ``{split}_info.json`` (``images``, ``id``, ``title``,
    ``description``) + ``images/``; caption = ``title + "." + description`` (release)."""

    LAYOUT = "<root>/{train,valid,test}_info.json\n<root>/images/<file>"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "Polyvore root", self.LAYOUT)
        split = split_name("polyvore", split)
        index = require(self.root / f"{split}_info.json", "info file", self.LAYOUT)
        self.ids: list[str] = []
        for rec in json.loads(index.read_text(encoding="utf-8")):
            cap = f"{rec.get('title', '')}.{rec.get('description', '')}"
            if not (rec.get("title") or rec.get("description")):
                raise ValueError(f"{index}: item {rec.get('id')!r} has no title or description")
            self._add(self.root / "images" / rec["images"], [cap], f"{index} item {rec['id']!r}")
            self.ids.append(str(rec["id"]))


def _check_level(level: str) -> None:
    if level not in ("category", "subcategory"):
        raise ValueError(f"level must be 'category' or 'subcategory', got {level!r}")


class Fashion200kClasses(LabelledRecords):
    """Fashion200k zero-shot: every listed image, labelled by its ``category`` (2nd path
    component, e.g. ``dresses``) or ``subcategory`` (3rd, e.g. ``casual_and_day_dresses``)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        level: str = "category",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        _check_level(level)
        root = require(Path(root), "Fashion200k root", Fashion200k.LAYOUT)
        split = split_name("fashion200k", split)
        pairs = []
        for cat in Fashion200k.CATEGORIES:
            f = require(root / f"{cat}_{split}_detect_all.txt", "label file", Fashion200k.LAYOUT)
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rel = line.split("\t")[0]
                    comps = rel.split("/")
                    if (root / rel).is_file() and len(comps) > 3:
                        pairs.append((root / rel, comps[1 if level == "category" else 2]))
        self._set(pairs, f"Fashion200k {split}")


class FashionGenClasses(LabelledRecords):
    """FashionGen zero-shot: images labelled by ``input_category`` or ``input_subcategory``
    (lower-cased, as the release)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "validation",
        level: str = "category",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        _check_level(level)
        root = require(Path(root), "FashionGen root", FashionGen.LAYOUT)
        split = split_name("fashiongen", split)
        self.file = require(
            root / f"fashiongen_256_256_{split}.hdf5", "HDF5 file", FashionGen.LAYOUT
        )
        h5 = _open_h5(self.file)
        key = "input_category" if level == "category" else "input_subcategory"
        names = [_decode(v).lower() for v in h5[key][:].reshape(-1)]
        self._set([(Path(f"{self.file}#{i}"), n) for i, n in enumerate(names)], str(self.file))
        self._h5: Any = None

    def load(self, index: int) -> tuple[Image.Image, str]:
        return _h5_image(self, index), f"{self.file}#{index}"

    def __getstate__(self):
        return _state_without_h5(self)


class PolyvoreClasses(LabelledRecords):
    """Polyvore zero-shot: items labelled by ``semantic_category`` of
    ``polyvore_item_metadata.json``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        root = require(Path(root), "Polyvore root", Polyvore.LAYOUT)
        split = split_name("polyvore", split)
        index = require(root / f"{split}_info.json", "info file", Polyvore.LAYOUT)
        meta_file = require(root / "polyvore_item_metadata.json", "item metadata", Polyvore.LAYOUT)
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        pairs = []
        for rec in json.loads(index.read_text(encoding="utf-8")):
            key = str(rec["id"])
            if key not in meta or "semantic_category" not in meta[key]:
                raise KeyError(f"{meta_file}: no semantic_category for item {key!r}")
            pairs.append((root / "images" / rec["images"], meta[key]["semantic_category"]))
        self._set(pairs, str(index))
