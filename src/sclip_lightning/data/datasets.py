"""Datasets in their native on-disk layouts.

Captioned items are ``{"image", "captions": list[str], "path"}``; class items are
``{"image", "label": int, "path"}``; unpaired items are ``{"image", "path"}``. ``image`` is
a PIL RGB image, or whatever ``transform`` makes of it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from sclip_lightning.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image
from sclip_lightning.data.names import clean_class_name

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any] | None


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout}")
    return path


class _ImageRecords(Dataset):
    """Shared logic: a list of records with an image path; corrupt-image handling."""

    def __init__(self, transform: Transform = None, skip_corrupt: bool = False) -> None:
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.paths: list[Path] = []
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _record(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.paths)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image = load_image(self.paths[i])
            except (CorruptImageError, FileNotFoundError):
                if not self.skip_corrupt:
                    raise
                if i not in self.skipped:
                    self.skipped.add(i)
                    log.warning(
                        "skip_corrupt: skipped unreadable image %s (%d skipped so far in this "
                        "process)",
                        self.paths[i],
                        len(self.skipped),
                    )
                continue
            item = self._record(i)
            item["image"] = self.transform(image) if self.transform else image
            item["path"] = str(self.paths[i])
            return item
        raise CorruptImageError(f"no readable image at all in {type(self).__name__} ({n} files)")


class CaptionedDataset(_ImageRecords):
    """Image paths with one or more captions each."""

    def __init__(self, transform: Transform = None, skip_corrupt: bool = False) -> None:
        super().__init__(transform, skip_corrupt)
        self.captions: list[list[str]] = []

    def _add(self, path: Path, captions: Sequence[str], where: str) -> None:
        caps = [str(c).strip() for c in captions if c is not None]
        if not caps:
            raise ValueError(f"{where}: image {path} has no caption. Add one or remove the record.")
        for c in caps:
            if not c:
                raise ValueError(
                    f"{where}: empty caption for image {path}. Fill or remove the caption."
                )
        self.paths.append(path)
        self.captions.append(caps)

    def _record(self, index: int) -> dict[str, Any]:
        return {"captions": list(self.captions[index])}


class CaptionTable(CaptionedDataset):
    """A CSV, TSV or JSONL table of image paths and captions (paths relative to the file).

    Rows that name the same image are merged (one image, several captions). A caption cell
    may also hold several captions separated by ``caption_separator``.

    Args:
        path: the table (``.csv``, ``.tsv``, ``.jsonl``/``.json`` lines).
        split: keep rows whose ``split_column`` equals this value (None: all rows).
        image_column: column with the image path.
        caption_column: one column name or a list of columns, each a caption.
        split_column: column with the split name (used only when ``split`` is given).
        caption_separator: optional separator inside a caption cell.
        transform: applied to the PIL image.
        skip_corrupt: skip unreadable images (counted and logged) instead of raising.
    """

    LAYOUT = "captions.csv with columns image,caption[,split]; image paths relative to the file"

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        image_column: str = "image",
        caption_column: str | list[str] = "caption",
        split_column: str = "split",
        caption_separator: str | None = None,
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.path = _require(Path(path), "caption table", self.LAYOUT)
        rows = list(_read_table(self.path))
        if not rows:
            raise ValueError(f"caption table {self.path} has no rows")
        cols = [caption_column] if isinstance(caption_column, str) else list(caption_column)
        needed = [image_column, *cols] + ([split_column] if split is not None else [])
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise KeyError(
                f"caption table {self.path} lacks column(s) {missing}; it has {list(rows[0])}. "
                "Set image_column / caption_column / split_column."
            )
        grouped: dict[str, list[str]] = {}
        for n, row in enumerate(rows, start=2 if self.path.suffix != ".jsonl" else 1):
            if split is not None and str(row[split_column]) != split:
                continue
            caps: list[str] = []
            for c in cols:
                cell = row[c]
                items = cell if isinstance(cell, list) else [cell]
                for item in items:
                    text = "" if item is None else str(item)
                    parts = text.split(caption_separator) if caption_separator else [text]
                    caps.extend(parts)
            for cap in caps:
                if not cap.strip():
                    raise ValueError(
                        f"{self.path} line {n}: empty caption for image {row[image_column]!r}. "
                        "Fill or remove the row."
                    )
            grouped.setdefault(str(row[image_column]), []).extend(caps)
        if not grouped:
            raise ValueError(f"caption table {self.path} has no rows for split {split!r}")
        for rel, caps in grouped.items():
            self._add(self.path.parent / rel, caps, str(self.path))


def _read_table(path: Path):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n}: not valid JSON ({e})") from e
        return
    delimiter = "\t" if suffix == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter=delimiter)


class RSICD(CaptionedDataset):
    """RSICD (Lu et al. 2017): ``dataset_rsicd.json`` (Karpathy style) + ``RSICD_images/``.

    Args:
        root: folder holding ``dataset_rsicd.json`` and ``RSICD_images/``.
        split: ``"train" | "val" | "test"`` or None for all images.
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
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), f"{type(self).__name__} root", self.LAYOUT)
        index = _require(self.root / self.INDEX, "caption index", self.LAYOUT)
        images = _require(self.root / self.IMAGES, "image folder", self.LAYOUT)
        data = json.loads(index.read_text(encoding="utf-8"))
        for rec in data["images"]:
            if split is not None and rec.get("split") != split:
                continue
            caps = [s["raw"] for s in rec.get("sentences", [])]
            self._add(images / rec["filename"], caps, f"{index} image {rec['filename']!r}")
        if not self.paths:
            raise ValueError(f"{index} has no images for split {split!r}")


class ImageFolderUnpaired(_ImageRecords):
    """Every image file below ``root`` (any depth), sorted, as unpaired images."""

    def __init__(
        self,
        root: str | Path,
        transform: Transform = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "unpaired image folder", "<root>/**/<image files>")
        exts = tuple(e.lower() for e in extensions)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts)
        if not self.paths:
            raise ValueError(f"no image files ({', '.join(exts)}) found below {self.root}")

    def _record(self, index: int) -> dict[str, Any]:
        return {}


class ClassFolder(_ImageRecords):
    """A ``<root>/<class>/<images>`` tree (UC Merced, WHU-RS19, RSSCN7, AID, RESISC45, ...).

    Args:
        root: the folder whose sub-folders are classes (sorted by folder name).
        drop_letter_prefix: strip RSSCN7's leading letter (``aGrass`` -> ``grass``).
    """

    LAYOUT = "<root>/<class name>/<image files>"

    def __init__(
        self,
        root: str | Path,
        transform: Transform = None,
        drop_letter_prefix: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "class folder root", self.LAYOUT)
        folders = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"no class sub-folders in {self.root}; expected {self.LAYOUT}")
        exts = tuple(e.lower() for e in extensions)
        self.folder_names = [d.name for d in folders]
        self.classes = [clean_class_name(d.name, drop_letter_prefix) for d in folders]
        self.labels: list[int] = []
        for label, d in enumerate(folders):
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in exts)
            self.paths.extend(files)
            self.labels.extend([label] * len(files))
        if not self.paths:
            raise ValueError(f"no image files found below {self.root}")

    def _record(self, index: int) -> dict[str, Any]:
        return {"label": self.labels[index]}


class RSICDClasses(_ImageRecords):
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
        self.root = _require(Path(root), "RSICD root", self.LAYOUT)
        lists = _require(self.root / "txtclasses_rsicd", "class lists", self.LAYOUT)
        images = _require(self.root / RSICD.IMAGES, "image folder", self.LAYOUT)
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
